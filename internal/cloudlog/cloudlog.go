// Package cloudlog is a log/slog handler that writes one JSON object per line in the shape Cloud Logging parses
// from a container's stdout (structured logging): severity, message, time (RFC 3339), trace and span, httpRequest,
// labels, and every other attribute as a field of jsonPayload.
//
// It is built on cloud.google.com/go/logging: severities, the HTTP request record, and the trace correlation
// (traceparent and X-Cloud-Trace-Context, formatted as projects/PROJECT/traces/ID) are that library's, through
// logging.ToLogEntry. It never calls the Logging API, needs no credentials, and asks no metadata server: the
// project comes from the caller.
package cloudlog

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"cloud.google.com/go/logging"
	"google.golang.org/protobuf/encoding/protojson"
)

// HTTPRequestKey is the attribute key under which a *logging.HTTPRequest becomes the entry's httpRequest.
const HTTPRequestKey = "httpRequest"

// Options configure a Handler.
type Options struct {
	ProjectID string            // for trace names; without it, entries carry no trace
	Level     slog.Leveler      // default Info
	Labels    map[string]string // logging.googleapis.com/labels on every entry
}

// Handler is a slog.Handler writing Cloud Logging structured JSON lines.
type Handler struct {
	out    *lockedWriter
	opts   Options
	attrs  []slog.Attr
	groups []string
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

// NewHandler returns a handler writing to w.
func NewHandler(w io.Writer, opts Options) *Handler {
	if opts.Level == nil {
		opts.Level = slog.LevelInfo
	}
	return &Handler{out: &lockedWriter{w: w}, opts: opts}
}

type ctxKey struct{}

// WithRequest returns a context that carries r, so entries logged with it are correlated with r's trace.
func WithRequest(ctx context.Context, r *http.Request) context.Context {
	return context.WithValue(ctx, ctxKey{}, r)
}

func (h *Handler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.opts.Level.Level() }

func (h *Handler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr{}, h.attrs...), qualify(h.groups, as)...)
	return &c
}

func (h *Handler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.groups = append(append([]string{}, h.groups...), name)
	return &c
}

// qualify nests attributes under the handler's open groups.
func qualify(groups []string, as []slog.Attr) []slog.Attr {
	for i := len(groups) - 1; i >= 0; i-- {
		args := make([]any, len(as))
		for j, a := range as {
			args[j] = a
		}
		as = []slog.Attr{slog.Group(groups[i], args...)}
	}
	return as
}

func (h *Handler) Handle(ctx context.Context, r slog.Record) error {
	entry := logging.Entry{Timestamp: r.Time, Severity: severity(r.Level), Payload: r.Message, Labels: h.opts.Labels}
	if entry.Timestamp.IsZero() {
		entry.Timestamp = time.Now()
	}
	fields := map[string]any{}
	var own []slog.Attr
	r.Attrs(func(a slog.Attr) bool {
		if hr, ok := a.Value.Any().(*logging.HTTPRequest); ok && a.Key == HTTPRequestKey {
			entry.HTTPRequest = hr
			return true
		}
		own = append(own, a)
		return true
	})
	for _, a := range append(append([]slog.Attr{}, h.attrs...), qualify(h.groups, own)...) {
		addAttr(fields, a)
	}

	// Trace correlation comes from the request: the one in the httpRequest, or the one the context carries.
	traceOnly := false
	if entry.HTTPRequest == nil {
		if req, ok := ctx.Value(ctxKey{}).(*http.Request); ok && req != nil {
			entry.HTTPRequest, traceOnly = &logging.HTTPRequest{Request: req}, true
		}
	}
	parent := "projects/" + h.opts.ProjectID
	pb, err := logging.ToLogEntry(entry, parent)
	if err != nil {
		return err
	}
	if h.opts.ProjectID != "" && pb.Trace != "" {
		fields["logging.googleapis.com/trace"] = pb.Trace
		if pb.SpanId != "" {
			fields["logging.googleapis.com/spanId"] = pb.SpanId
		}
		if pb.TraceSampled {
			fields["logging.googleapis.com/trace_sampled"] = true
		}
	}
	if pb.HttpRequest != nil && !traceOnly {
		raw, err := protojson.Marshal(pb.HttpRequest)
		if err != nil {
			return err
		}
		fields["httpRequest"] = json.RawMessage(raw)
	}
	if len(pb.Labels) > 0 {
		fields["logging.googleapis.com/labels"] = pb.Labels
	}
	fields["severity"] = pb.Severity.String()
	fields["message"] = r.Message
	fields["time"] = pb.Timestamp.AsTime().Format(time.RFC3339Nano)

	var line bytes.Buffer
	enc := json.NewEncoder(&line)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(fields); err != nil { // Encode ends the line
		return err
	}
	h.out.mu.Lock()
	defer h.out.mu.Unlock()
	_, err = h.out.w.Write(line.Bytes())
	return err
}

func severity(l slog.Level) logging.Severity {
	switch {
	case l >= slog.LevelError:
		return logging.Error
	case l >= slog.LevelWarn:
		return logging.Warning
	case l >= slog.LevelInfo:
		return logging.Info
	default:
		return logging.Debug
	}
}

func addAttr(fields map[string]any, a slog.Attr) {
	v := a.Value.Resolve()
	if a.Key == "" && v.Kind() != slog.KindGroup {
		return
	}
	switch v.Kind() {
	case slog.KindGroup:
		group := fields
		if a.Key != "" {
			group = map[string]any{}
			fields[a.Key] = group
		}
		for _, g := range v.Group() {
			addAttr(group, g)
		}
	case slog.KindDuration:
		fields[a.Key] = v.Duration().String()
	case slog.KindTime:
		fields[a.Key] = v.Time().Format(time.RFC3339Nano)
	case slog.KindAny:
		if err, ok := v.Any().(error); ok {
			fields[a.Key] = err.Error()
			return
		}
		if _, err := json.Marshal(v.Any()); err != nil {
			fields[a.Key] = fmt.Sprintf("%+v", v.Any()) // an entry is never lost to a value JSON cannot hold
			return
		}
		fields[a.Key] = v.Any()
	default:
		fields[a.Key] = v.Any()
	}
}
