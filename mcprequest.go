package safepy

// What /mcp takes: a message read and checked as /execute reads and checks a body, before the SDK parses it.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/safe-py/safepy/internal/cloudlog"
)

// serveMCP caps and reads the body as /execute does (the same cap, the same budget, the same pace), then hands the
// request to the SDK with the body in memory.
func (s *Service) serveMCP(w http.ResponseWriter, r *http.Request) {
	call := &mcpCall{ctx: cloudlog.WithRequest(r.Context(), r)}
	defer call.release()
	if r.Method == http.MethodPost {
		held := call.newHold(s.mem)
		head := &prefix{max: 4 << 10}
		r.Body = struct {
			io.Reader
			io.Closer
		}{io.TeeReader(r.Body, head), r.Body}
		body, status, aerr := readBody(w, r, held, s.cfg.MaxBodyBytes)
		if aerr != nil {
			rpcError(w, status, requestID(head.b), aerr.Message, rpcInvalidRequest)
			return
		}
		// The SDK reads the body whole and parses it: a few times its size for a moment, as for /execute.
		if !held.TryGrow(decodeCost * int64(len(body))) {
			rpcError(w, http.StatusServiceUnavailable, requestID(body), errBodyBudget.Error(), rpcInvalidRequest)
			return
		}
		if code, why := checkMCPMessage(body); why != "" {
			s.log.LogAttrs(call.ctx, slog.LevelWarn, "mcp request refused", slog.String("reason", why),
				slog.Int("body_bytes", len(body)))
			rpcError(w, http.StatusBadRequest, requestID(body), why, code)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	// The SDK writes the answer whole; it is sent at answerRate or faster, as /execute's is, and a client that
	// reads slower is cut off rather than holding the answer's room until the server's write timeout.
	pw := &pacedResponse{ResponseWriter: w, rc: http.NewResponseController(w)}
	s.mcp.ServeHTTP(pw, r.WithContext(context.WithValue(r.Context(), mcpCallKey{}, call)))
	if err := pw.finish(); err != nil {
		s.log.LogAttrs(call.ctx, slog.LevelWarn, "mcp answer not sent", slog.Int64("written_bytes", pw.written()),
			slog.Float64("writing_ms", ms(time.Since(pw.began()))), slog.String("error", err.Error()))
	}
}

// rpcError refuses a request the SDK never saw with the HTTP status /execute would give it, and a JSON-RPC error
// as the body: a client reads that as this one request's failure and keeps its session (a bare status ends it).
func rpcError(w http.ResponseWriter, status int, id any, message string, code int) {
	if status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	b, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": id,
		"error": map[string]any{"code": code, "message": message}})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// JSON-RPC's error codes for a message refused before the SDK sees it.
const (
	rpcParseError     = -32700
	rpcInvalidRequest = -32600
	rpcNoSuchMethod   = -32601
)

// mcpMethods are the requests /mcp serves: what a client needs to find and call the one tool. Everything else the
// SDK knows (subscriptions/listen, which holds its stream open for as long as the client likes; resources/read;
// completions) has no use here and is refused before the SDK sees it. Notifications (no answer, no stream) pass.
var mcpMethods = map[string]bool{"initialize": true, "ping": true, "tools/list": true, "tools/call": true,
	"resources/list": true, "resources/templates/list": true, "prompts/list": true}

// checkMCPMessage holds a JSON-RPC message to what /execute holds a body to before the SDK parses it: valid UTF-8,
// one JSON object (no batch: one HTTP request is one call, so the admission gate and Cloud Run's concurrency count
// calls), no duplicate keys, no lone surrogates, bounded keys, elements and depth (checkJSON); an id that is a
// string or an integer; and a method of mcpMethods. It returns a JSON-RPC error code and why ("" if it passes).
func checkMCPMessage(body []byte) (int, string) {
	if !utf8.Valid(body) {
		return rpcParseError, fmt.Sprintf("the message is not valid UTF-8 (at byte %d)", invalidUTF8At(body))
	}
	if start := bytes.TrimLeft(body, " \t\r\n"); len(start) > 0 && start[0] == '[' {
		return rpcInvalidRequest, "batches are not served: send one JSON-RPC message per request"
	}
	if err := checkJSON(body); err != nil {
		return rpcParseError, strings.Replace(err.Error(), "request body", "the message", 1)
	}
	var m struct {
		ID     json.RawMessage `json:"id"`
		Method string          `json:"method"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		return rpcInvalidRequest, "the message is not a JSON-RPC request"
	}
	if len(m.ID) > 0 && !jsonrpcID.Match(m.ID) {
		return rpcInvalidRequest, "the message's id must be a string or an integer"
	}
	switch {
	case m.Method == "":
		return rpcInvalidRequest, "the message is not a request: this server sends no requests to answer"
	case strings.HasPrefix(m.Method, "notifications/"), mcpMethods[m.Method]:
		return 0, ""
	}
	return rpcNoSuchMethod, fmt.Sprintf("method %s is not served here", strconv.Quote(clip(m.Method, 100)))
}

// jsonrpcID matches the ids checkMCPMessage accepts: a string, or an integer of at most 18 digits (any int64).
var jsonrpcID = regexp.MustCompile(`^("(?:[^"\\]|\\.)*"|-?[0-9]{1,18})$`)

// prefix keeps the first max bytes written to it.
type prefix struct {
	b   []byte
	max int
}

func (p *prefix) Write(b []byte) (int, error) {
	if n := min(len(b), p.max-len(p.b)); n > 0 {
		p.b = append(p.b, b[:n]...)
	}
	return len(b), nil
}

// requestID finds a JSON-RPC request's id in the start of its body (a body refused for its size is not read whole):
// clients write it before the params. nil when it is not there.
func requestID(head []byte) any {
	dec := json.NewDecoder(bytes.NewReader(head))
	dec.UseNumber()
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil
	}
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			return nil
		}
		var v any
		if err := dec.Decode(&v); err != nil {
			return nil
		}
		if key == "id" {
			switch v.(type) {
			case json.Number, string:
				return v
			}
			return nil
		}
	}
	return nil
}
