package safepy

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
	"strings"
	"sync/atomic"
	"time"

	"cloud.google.com/go/logging"

	"github.com/safe-py/safepy/admission"
	"github.com/safe-py/safepy/cloudlog"
	"github.com/safe-py/safepy/connlimit"
	"github.com/safe-py/safepy/internal/budget"
	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/sandbox"
)

// Service serves the contract's two endpoints on top of a sandbox.Runner.
type Service struct {
	cfg    Config
	runner *sandbox.Runner
	gate   *admission.Gate
	log    *slog.Logger
	ready  atomic.Bool
	mem    *budget.Budget // bytes of request bodies and answers held in memory at once
}

// memoryBudget bounds what the server holds for its clients at once: request bodies as they arrive and while
// their scripts wait and run, and answers until they are written. Many clients sending large bodies, or not reading
// large answers, together get 503 rather than the server's memory. It holds at least two of the largest body or
// answer the caps allow. Besides it, each connection has smallHold of a reserve for its own request (see package
// budget): a small body and a small answer, the ordinary request's, always find room, however many large ones hold
// the rest.
const (
	memoryBudget = 64 << 20
	smallHold    = 64 << 10
)

// answerWait bounds how long an answer waits for room in the budget, holding its slot, before the request gets
// 503: answers being written free their room as their clients read them, or within seconds when they do not.
const answerWait = time.Second

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
	// The slots and the pools are sized from the limits before there is a Runner; the Runner gets the definition
	// read here, so that nsjail.cfg is read once.
	def, err := jaildef.Read(cfg.Sandbox.Nsjail, cfg.Sandbox.JailConfig)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", sandbox.ErrSandbox, err)
	}
	cfg.Sandbox.Definition = def
	limits := def.Limits()
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
	// The largest a request can hold: its body while it is decoded, or its answer (a compacted copy of its result
	// too) at the caps.
	largest := max(cfg.MaxBodyBytes*(1+decodeCost), (&answer{}).size()+runner.MaxOutcomeBytes()+int64(cfg.Sandbox.MaxResultBytes))
	s := &Service{cfg: cfg, runner: runner, log: log, gate: gate, mem: budget.New(max(memoryBudget, 2*largest), smallHold, cfg.MaxConns)}
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
// durations, the script's size and a hash, what the answer held and how much of it was written. Never the script,
// its output or its result.
//
// What the request holds in memory is counted in the service's budget from its first byte to its last: its body as
// it arrives (a client that announces a large body and sends it slowly holds only what it sent, and is cut off
// below bodyRate), then the answer until the client has it. The connection is held (connlimit.Hold) only while
// the request waits for a slot and runs: reading a body, or writing an answer the client may not read, it can be
// closed to make room like an idle one.
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
	script := req.Script
	sum := sha256.Sum256(script)
	begin := time.Now()
	entry := []slog.Attr{slog.Int("script_bytes", len(script)), slog.String("script_sha256", hex.EncodeToString(sum[:8]))}
	unhold := connlimit.Hold(r.Context())
	defer unhold()
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
	req, script = executeRequest{}, nil // not needed any more: the hold becomes the answer's
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
		return append(entry, slog.String("outcome", "canceled"))
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
	ctx, cancel := context.WithTimeout(r.Context(), answerWait)
	err = held.Resize(ctx, a.size())
	cancel()
	release()
	entry = append(entry, slog.Int64("answer_bytes", a.size()))
	if err != nil {
		return s.overloaded(w, entry, answerWait, "the server is writing too many large answers at once; retry later")
	}
	unhold()
	sent, err := send(w, a)
	entry = append(entry, slog.Int64("answer_sent", sent))
	if err != nil {
		entry = append(entry, slog.String("answer_error", err.Error()))
	}
	return entry
}

// overloaded answers 503 with a Retry-After in whole seconds, rounded up.
func (s *Service) overloaded(w http.ResponseWriter, entry []slog.Attr, retryAfter time.Duration, message string) []slog.Attr {
	w.Header().Set("Retry-After", strconv.Itoa(int((retryAfter+time.Second-1)/time.Second)))
	writeError(w, http.StatusServiceUnavailable, apiError{Type: "Overloaded", Message: message}, nil)
	return append(entry, slog.String("outcome", "Overloaded"))
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
