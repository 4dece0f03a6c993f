package safepy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cloud.google.com/go/logging"

	"github.com/safe-py/safepy/admission"
	"github.com/safe-py/safepy/cloudlog"
	"github.com/safe-py/safepy/sandbox"
)

// Service serves the contract's two endpoints on top of a sandbox.Runner.
type Service struct {
	cfg    Config
	runner *sandbox.Runner
	gate   *admission.Gate
	log    *slog.Logger
	ready  atomic.Bool
	bodies *budget // bytes of request bodies held in memory at once
}

// bodyBudget bounds the request bodies the server holds at once (read, queued or running): many clients sending
// large bodies together get 503 rather than the server's memory.
const bodyBudget = 64 << 20

// selfCheck is run in the real jail before the service reports healthy: the interpreter, numpy and pandas
// import, the script runs as an unprivileged user, and the result and stdout channels work.
const selfCheck = `import os
def main():
    import numpy, pandas
    print("self-check")
    return {"uid": os.getuid(), "rows": int(pandas.DataFrame({"a": [1, 2]}).shape[0]), "sum": int(numpy.sum([1, 2]))}
`

const selfCheckWant = `{"uid": 1000, "rows": 2, "sum": 3}`

// NewService prepares the sandbox and proves it works by running a script in it. It returns an error, and no
// service, if the sandbox cannot run scripts.
func NewService(cfg Config, log *slog.Logger) (*Service, error) {
	limits, err := sandbox.ReadLimits(cfg.Sandbox.JailConfig)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", sandbox.ErrSandbox, err)
	}
	mem := availableMemory()
	if cfg.Slots <= 0 {
		// Sized for the path the configuration asks for; a host that refuses fork servers runs cold, with warm
		// jails that hold more (the start-up log says which path is in use).
		cfg.Slots = defaultSlots(limits.MemoryBytes, mem, cfg.Sandbox.ForkServers && cfg.Sandbox.PoolSize != 0)
	}
	if cfg.Sandbox.PoolSize < 0 {
		cfg.Sandbox.PoolSize = cfg.Slots // a warm jail for each slot: a full house of requests all start warm
	}
	if mem > 2*serverShare && cfg.Sandbox.AllJailsMemory == 0 {
		cfg.Sandbox.AllJailsMemory = mem - serverShare
	}
	gate := admission.New(admission.Config{Slots: cfg.Slots, Wait: cfg.QueueWait, Turn: limits.Wall + startupAllowance})
	cfg.QueueWait = gate.Wait()
	// The pools refill only while a slot is free and nobody waits: under saturation every CPU goes to requests.
	cfg.Sandbox.Busy = func() bool { running, waiting := gate.InUse(); return running >= cfg.Slots || waiting > 0 }
	runner, err := sandbox.New(cfg.Sandbox)
	if err != nil {
		return nil, err
	}
	info := runner.Info()
	attrs := []any{"cgroup_mode", info.CgroupMode, "jails", info.Path, "versions", info.Versions, "wall", info.Limits.Wall.String(),
		"memory_bytes", info.Limits.MemoryBytes, "processes", info.Limits.Processes,
		"slots", cfg.Slots, "max_queue", gate.MaxQueue(), "queue_wait", cfg.QueueWait.String(), "pool", cfg.Sandbox.PoolSize}
	if info.PathNote != "" {
		attrs = append(attrs, "jails_note", info.PathNote)
	}
	if info.CgroupMode == sandbox.CgroupNone {
		log.Warn("no usable cgroups: memory and processes are limited per process with rlimits",
			append(attrs, "reason", info.CgroupNote)...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := runner.Run(ctx, []byte(selfCheck))
	if err == nil && (string(out.Result) != selfCheckWant || out.Stdout != "self-check\n") {
		err = fmt.Errorf("unexpected answer %s with stdout %q", out.Result, out.Stdout)
	}
	if err != nil {
		runner.Close()
		return nil, fmt.Errorf("%w: the start-up self-check failed: %v", sandbox.ErrSandbox, err)
	}
	log.Info("sandbox ready", append(attrs, "self_check_startup", out.Timing.Startup.String(),
		"self_check_run", out.Timing.Run.String())...)
	s := &Service{cfg: cfg, runner: runner, log: log, gate: gate, bodies: newBudget(max(bodyBudget, 2*cfg.MaxBodyBytes))}
	s.ready.Store(true)
	return s, nil
}

// Drain makes /health answer 503 from now on: the server is shutting down and takes no new work.
func (s *Service) Drain() { s.ready.Store(false) }

// JailPath says how jails are made: "forked" from fork servers, or "cold".
func (s *Service) JailPath() string { return s.runner.Info().Path }

// QueueWait is the longest a request waits for a slot.
func (s *Service) QueueWait() time.Duration { return s.gate.Wait() }

// MaxQueue is the longest the queue for a slot may grow.
func (s *Service) MaxQueue() int { return s.gate.MaxQueue() }

// Slots is the number of executions that run at once.
func (s *Service) Slots() int { return s.gate.Slots() }

// WarmJails is how many warm jails are ready now, and how many the pools keep.
func (s *Service) WarmJails() (ready, size int) { return s.runner.WarmJails() }

// Close releases the sandbox's start-up resources.
func (s *Service) Close() error { return s.runner.Close() }

func (s *Service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/execute":
		if r.Method != http.MethodPost {
			methodNotAllowed(w, "POST")
			return
		}
		// One log entry per execution request, written once the answer is out, with its httpRequest and trace.
		begin := time.Now()
		r = r.WithContext(cloudlog.WithRequest(r.Context(), r))
		rec := &recorder{ResponseWriter: w}
		entry := s.execute(rec, r)
		level := slog.LevelInfo
		if rec.status >= 500 {
			level = slog.LevelError
			if rec.status == http.StatusServiceUnavailable {
				level = slog.LevelWarn
			}
		}
		s.log.LogAttrs(r.Context(), level, "execution", append(entry, slog.Any(cloudlog.HTTPRequestKey, &logging.HTTPRequest{
			Request: loggable(r), RequestSize: r.ContentLength, Status: rec.status, ResponseSize: rec.size,
			Latency: time.Since(begin), RemoteIP: remoteIP(r.RemoteAddr)}))...)
	case "/health", "/healthz": // Cloud Run's front end answers paths ending in z itself: /health is for it
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			methodNotAllowed(w, "GET, HEAD")
			return
		}
		if !s.ready.Load() {
			writeError(w, http.StatusServiceUnavailable, apiError{Type: "Unavailable", Message: "not ready"}, nil)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	default:
		writeError(w, http.StatusNotFound, apiError{Type: "NotFound",
			Message: fmt.Sprintf("no such path %q; use POST /execute", clip(r.URL.Path, maxLoggedLen))}, nil)
	}
}

// execute answers one execution request and returns what its log entry says: the outcome, the limit hit, the
// durations, the script's size and a hash. Never the script, its output or its result.
func (s *Service) execute(w http.ResponseWriter, r *http.Request) []slog.Attr {
	held, ok := s.bodies.take(bodyReservation(r, s.cfg.MaxBodyBytes))
	if !ok {
		return s.overloaded(w, nil, time.Second, "the server is reading too many request bodies at once; retry later")
	}
	defer s.bodies.give(held)
	req, status, verr := decodeRequest(w, r, s.cfg.MaxBodyBytes, s.cfg.MaxScriptBytes, s.runner.Limits().TmpfsInodes)
	if verr != nil {
		writeError(w, status, *verr, nil)
		return []slog.Attr{slog.String("outcome", verr.Type)}
	}
	script := req.Script
	sum := sha256.Sum256(script)
	begin := time.Now()
	entry := []slog.Attr{slog.Int("script_bytes", len(script)), slog.String("script_sha256", hex.EncodeToString(sum[:8]))}
	release, err := s.gate.Acquire(r.Context())
	entry = append(entry, slog.Float64("queue_ms", ms(time.Since(begin))))
	if err != nil {
		var refusal *admission.Refusal
		if !errors.As(err, &refusal) {
			return append(entry, slog.String("outcome", "canceled")) // the client left while queued
		}
		return s.overloaded(w, entry, refusal.RetryAfter,
			fmt.Sprintf("all %d execution slots are busy and the queue cannot serve this request within %s; retry later",
				s.gate.Slots(), s.gate.Wait()))
	}
	out, err := s.runner.Run(r.Context(), script, req.Files...)
	release()
	entry = append(entry, slog.Bool("warm", out.Warm), slog.Bool("forked", out.Forked), slog.Int64("jail_base_bytes", out.BaseMemory),
		slog.Int64("jail_peak_bytes", out.PeakMemory), slog.Float64("startup_ms", ms(out.Timing.Startup)), slog.Float64("run_ms", ms(out.Timing.Run)),
		slog.Float64("total_ms", ms(time.Since(begin))))

	var se *sandbox.ScriptError
	switch {
	case err == nil:
		writeJSON(w, http.StatusOK, successResponse{Result: out.Result, Stdout: out.Stdout, StdoutTruncated: out.StdoutTruncated,
			Stderr: out.Stderr, StderrTruncated: out.StderrTruncated, Files: out.Files})
		return append(entry, slog.String("outcome", "ok"))
	case errors.As(err, &se):
		writeError(w, http.StatusUnprocessableEntity, apiError{Type: string(se.Kind), Message: se.Message,
			Traceback: se.Traceback, Limit: string(se.Limit)}, &out)
		return append(entry, slog.String("outcome", string(se.Kind)), slog.String("limit", string(se.Limit)))
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		// The client went away; the jail is already gone. There is nobody to answer.
		return append(entry, slog.String("outcome", "canceled"))
	default:
		var stdout *sandbox.Outcome
		if out.Started {
			stdout = &out
		}
		writeError(w, http.StatusInternalServerError, apiError{Type: "InternalError",
			Message: "the sandbox failed; this is not caused by the script"}, stdout)
		return append(entry, slog.String("outcome", "InternalError"), slog.String("error", err.Error()))
	}
}

// overloaded answers 503 with a Retry-After in whole seconds, rounded up.
func (s *Service) overloaded(w http.ResponseWriter, entry []slog.Attr, retryAfter time.Duration, message string) []slog.Attr {
	w.Header().Set("Retry-After", strconv.Itoa(int((retryAfter+time.Second-1)/time.Second)))
	writeError(w, http.StatusServiceUnavailable, apiError{Type: "Overloaded", Message: message}, nil)
	return append(entry, slog.String("outcome", "Overloaded"))
}

// bodyReservation is what a request's body may take of the budget: what it says it is, or the cap.
func bodyReservation(r *http.Request, maxBody int64) int64 {
	if r.ContentLength >= 0 && r.ContentLength <= maxBody {
		return r.ContentLength
	}
	return maxBody
}

// budget is a count of bytes that requests take and give back.
type budget struct {
	mu   sync.Mutex
	left int64
}

func newBudget(n int64) *budget { return &budget{left: n} }

func (b *budget) take(n int64) (int64, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if n > b.left {
		return 0, false
	}
	b.left -= n
	return n, true
}

func (b *budget) give(n int64) {
	b.mu.Lock()
	b.left += n
	b.mu.Unlock()
}

// maxLoggedLen bounds what of a client's URL, User-Agent and Referer reaches a log line.
const maxLoggedLen = 512

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "..."
}

// loggable is the part of r the access log records, with what the client controls cut to a sane length.
func loggable(r *http.Request) *http.Request {
	h := http.Header{}
	for _, k := range []string{"User-Agent", "Referer", "Traceparent", "X-Cloud-Trace-Context"} {
		if v := r.Header.Get(k); v != "" {
			h.Set(k, clip(v, maxLoggedLen))
		}
	}
	return &http.Request{Method: r.Method, URL: &url.URL{Opaque: clip(r.URL.RequestURI(), maxLoggedLen)},
		Proto: r.Proto, Header: h, RemoteAddr: r.RemoteAddr, Host: clip(r.Host, maxLoggedLen)}
}

func remoteIP(addr string) string {
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}

// recorder remembers the status and size of an answer for its log entry.
type recorder struct {
	http.ResponseWriter
	status int
	size   int64
}

func (r *recorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
	r.ResponseWriter.WriteHeader(status)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.size += int64(n)
	return n, err
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// The answers' shapes. stderr and files are there only when the script wrote to stderr or left files: a request
// that did neither gets the answer it got before they existed, byte for byte.
type successResponse struct {
	Result          json.RawMessage      `json:"result"`
	Stdout          string               `json:"stdout"`
	StdoutTruncated bool                 `json:"stdout_truncated,omitempty"`
	Stderr          string               `json:"stderr,omitempty"`
	StderrTruncated bool                 `json:"stderr_truncated,omitempty"`
	Files           []sandbox.OutputFile `json:"files,omitempty"`
}

type apiError struct {
	Type      string `json:"type"`
	Message   string `json:"message"`
	Traceback string `json:"traceback,omitempty"`
	Limit     string `json:"limit,omitempty"`
}

type errorResponse struct {
	Error           apiError             `json:"error"`
	Stdout          *string              `json:"stdout,omitempty"`
	StdoutTruncated bool                 `json:"stdout_truncated,omitempty"`
	Stderr          string               `json:"stderr,omitempty"`
	StderrTruncated bool                 `json:"stderr_truncated,omitempty"`
	Files           []sandbox.OutputFile `json:"files,omitempty"`
}

// writeError answers with the contract's error shape; stdout is included whenever the script started, stderr and
// files whenever it left any.
func writeError(w http.ResponseWriter, status int, e apiError, out *sandbox.Outcome) {
	resp := errorResponse{Error: e}
	if out != nil && out.Started {
		resp.Stdout, resp.StdoutTruncated = &out.Stdout, out.StdoutTruncated
		resp.Stderr, resp.StderrTruncated, resp.Files = out.Stderr, out.StderrTruncated, out.Files
	}
	writeJSON(w, status, resp)
}

func methodNotAllowed(w http.ResponseWriter, allow string) {
	w.Header().Set("Allow", allow)
	writeError(w, http.StatusMethodNotAllowed, apiError{Type: "MethodNotAllowed",
		Message: "method not allowed; allowed: " + allow}, nil)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		status = http.StatusInternalServerError
		buf.Reset()
		buf.WriteString(`{"error":{"type":"InternalError","message":"could not encode the response"}}` + "\n")
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}
