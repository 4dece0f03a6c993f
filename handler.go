package safepy

// The handler: the contract's routes, and one execution request from its body to its answer and log entry.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/safe-py/safepy/internal/admission"
	"github.com/safe-py/safepy/internal/budget"
	"github.com/safe-py/safepy/internal/connlimit"
	"github.com/safe-py/safepy/sandbox"
)

// answerWait bounds how long an answer waits for room in the budget, holding its slot, before the request gets
// 503: answers being written free their room as their clients read them, or within seconds when they do not.
const answerWait = time.Second

// execute answers one execution request and returns what its log entry says: the outcome, the limit hit, the
// durations, the script's size and a hash, what the answer held and how much of it was written. Never the script,
// its output or its result.
//
// What the request holds in memory is counted in the service's budget from its first byte to its last: its body as
// it arrives (a client that announces a large body and sends it slowly holds only what it sent, and is cut off
// below bodyRate), then the answer until the client has it.
func (s *Service) execute(w http.ResponseWriter, r *http.Request) []slog.Attr {
	held := s.mem.NewHold()
	defer held.Release()
	req, status, verr := decodeRequest(w, r, held, s.cfg.MaxBodyBytes, s.cfg.MaxScriptBytes, s.runner.Limits().TmpfsInodes)
	if verr != nil {
		if status == http.StatusServiceUnavailable {
			return s.overloaded(w, nil, time.Second, verr.Message)
		}
		writeError(w, status, *verr, nil)
		return []slog.Attr{slog.String("outcome", verr.Type)}
	}
	x := s.run(r.Context(), &req, held, (*answer).size)
	switch {
	case x.refused != nil:
		return s.overloaded(w, x.entry, x.refused.retryAfter, x.refused.message)
	case x.answer == nil:
		return x.entry
	}
	sent, err := send(w, x.answer)
	entry := append(x.entry, slog.Int64("answer_sent", sent))
	if err != nil {
		entry = append(entry, slog.String("answer_error", err.Error()))
	}
	return entry
}

// execution is what run made of a request: an answer to send, or a refusal (503), or neither when the client left.
type execution struct {
	answer  *answer
	refused *refusal
	entry   []slog.Attr // for the request's log entry
}

// refusal is a 503's content: when to retry, and why.
type refusal struct {
	retryAfter time.Duration
	message    string
}

// run takes a validated request through the admission gate into a jail and makes its answer: the one way a script
// runs, whichever way it came in. held holds the request (its script and files); once the script has run it is
// made what cost says the caller's encoding of the answer holds at its largest, which the caller keeps until the
// client has the answer. req is cleared once the jail has it.
//
// The connection is held (connlimit.Hold) only while the request waits for a slot and runs: reading a body, or
// writing an answer the client may not read, it can be closed to make room like an idle one.
func (s *Service) run(ctx context.Context, req *executeRequest, held *budget.Hold, cost func(*answer) int64) execution {
	script := req.Script
	sum := sha256.Sum256(script)
	begin := time.Now()
	entry := []slog.Attr{slog.Int("script_bytes", len(script)), slog.String("script_sha256", hex.EncodeToString(sum[:8]))}
	unhold := connlimit.Hold(ctx)
	defer unhold()
	release, err := s.gate.Acquire(ctx)
	entry = append(entry, slog.Float64("queue_ms", ms(time.Since(begin))))
	if err != nil {
		var ref *admission.Refusal
		if !errors.As(err, &ref) {
			return execution{entry: append(entry, slog.String("outcome", "canceled"))} // the client left while queued
		}
		return execution{entry: entry, refused: &refusal{retryAfter: ref.RetryAfter, message: fmt.Sprintf(
			"all %d execution slots are busy and the queue cannot serve this request within %s; retry later",
			s.gate.Slots(), s.gate.Wait())}}
	}
	out, err := s.runner.Run(ctx, script, req.Files...)
	*req, script = executeRequest{}, nil // not needed any more: the hold becomes the answer's
	entry = append(entry, slog.Bool("warm", out.Warm), slog.Bool("forked", out.Forked), slog.Int64("jail_base_bytes", out.BaseMemory),
		slog.Int64("jail_peak_bytes", out.PeakMemory), slog.Float64("startup_ms", ms(out.Timing.Startup)), slog.Float64("run_ms", ms(out.Timing.Run)),
		slog.Float64("total_ms", ms(time.Since(begin))))

	var a *answer
	var se *sandbox.ScriptError
	switch {
	case err == nil:
		a = &answer{status: http.StatusOK, out: &out}
		entry = append(entry, slog.String("outcome", "ok"))
	case errors.As(err, &se):
		a = &answer{status: http.StatusUnprocessableEntity, out: &out,
			err: &apiError{Type: string(se.Kind), Message: se.Message, Traceback: se.Traceback, Limit: string(se.Limit)}}
		entry = append(entry, slog.String("outcome", string(se.Kind)), slog.String("limit", string(se.Limit)))
	case errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
		// The client went away; the jail is already gone. There is nobody to answer.
		release()
		return execution{entry: append(entry, slog.String("outcome", "canceled"))}
	default:
		a = &answer{status: http.StatusInternalServerError,
			err: &apiError{Type: "InternalError", Message: "the sandbox failed; this is not caused by the script"}}
		if out.Started {
			a.out = &out
		}
		entry = append(entry, slog.String("outcome", "InternalError"), slog.String("error", err.Error()))
	}
	// The answer is held in memory until the client has it. Room for it is found while the slot is still held, so
	// that answers waiting for room never outnumber the slots.
	wait, cancel := context.WithTimeout(ctx, answerWait)
	charge := cost(a)
	err = held.Resize(wait, charge)
	cancel()
	release()
	entry = append(entry, slog.Int64("answer_bytes", charge))
	if err != nil {
		return execution{entry: entry, refused: &refusal{retryAfter: answerWait,
			message: "the server is writing too many large answers at once; retry later"}}
	}
	return execution{answer: a, entry: entry}
}

// retrySeconds is a Retry-After in whole seconds, rounded up: what /execute's header and the MCP tool's error say.
func retrySeconds(d time.Duration) int { return int((d + time.Second - 1) / time.Second) }

// overloaded answers 503 with a Retry-After in whole seconds, rounded up.
func (s *Service) overloaded(w http.ResponseWriter, entry []slog.Attr, retryAfter time.Duration, message string) []slog.Attr {
	w.Header().Set("Retry-After", strconv.Itoa(retrySeconds(retryAfter)))
	writeError(w, http.StatusServiceUnavailable, apiError{Type: "Overloaded", Message: message}, nil)
	return append(entry, slog.String("outcome", "Overloaded"))
}

// maxLoggedLen bounds what of a client's URL, User-Agent and Referer reaches a log line.
const maxLoggedLen = 512

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

// Unwrap lets http.ResponseController reach the connection's deadlines and flush.
func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.size += int64(n)
	return n, err
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
