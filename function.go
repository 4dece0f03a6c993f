// Package safepy is the HTTP edge of safe-py: it decodes and validates a request, hands the script to the
// sandbox package, and encodes the outcome as docs/contract.md describes. Policy lives in the sandbox.
package safepy

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"
)

func init() {
	functions.HTTP(FunctionName, Execute)
}

// shared is the process's one service, the one Execute serves.
var shared preparation

// preparation builds the shared service: configuration and logger once, then the sandbox and its self-check until
// an attempt succeeds, at most one attempt per PrepareRetry.
type preparation struct {
	ready atomic.Pointer[Service] // set once an attempt succeeded: the fast path of every request after

	mu         sync.Mutex // held for a whole attempt: requests that arrive meanwhile wait for its outcome
	configured bool
	cfg        Config
	log        *slog.Logger
	cfgErr     error     // the environment does not change: an invalid configuration stays invalid
	err        error     // the last attempt's failure
	attempts   int       // failed attempts so far
	next       time.Time // no attempt before this
}

// notReady is what Prepare returns while there is no service: why, and when the next attempt may be made.
type notReady struct {
	err           error
	invalidConfig bool
	retryAt       time.Time // zero when no retry will help
}

func (e *notReady) Error() string { return e.err.Error() }
func (e *notReady) Unwrap() error { return e.err }

// Prepare returns the process's service, building it if it is not built yet: the configuration is read from the
// environment (once) and the logger made (see Configure), then the sandbox is set up and a start-up self-check
// runs a real script in the real jail. The function calls it on every request; a main calls PrepareWith before
// serving, so that a broken sandbox stops the start.
//
// A failed attempt is not the end: a later call tries again, but no sooner than SAFEPY_PREPARE_RETRY (10 s)
// after the failure, so a sandbox that was not ready yet gets another chance and a broken one is not rebuilt on
// every request. Until an attempt succeeds there is no service, and no script runs.
func Prepare() (*Service, error) {
	return shared.prepare(nil, nil)
}

// PrepareWith is Prepare with the configuration and logger a main already has from Configure.
func PrepareWith(cfg Config, log *slog.Logger) (*Service, error) {
	return shared.prepare(&cfg, log)
}

func (p *preparation) prepare(cfg *Config, log *slog.Logger) (*Service, error) {
	if svc := p.ready.Load(); svc != nil {
		return svc, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if svc := p.ready.Load(); svc != nil {
		return svc, nil
	}
	if !p.configured {
		if cfg != nil {
			p.cfg, p.log = *cfg, log
		} else {
			p.cfg, p.log, p.cfgErr = Configure(context.Background(), os.Stdout)
			if p.cfgErr != nil {
				p.log.Error("the configuration is invalid: refusing to serve", "error", p.cfgErr.Error())
			}
		}
		p.configured = true
	}
	if p.cfgErr != nil {
		return nil, &notReady{err: p.cfgErr, invalidConfig: true}
	}
	if time.Now().Before(p.next) {
		return nil, &notReady{err: p.err, retryAt: p.next}
	}
	svc, err := NewService(p.cfg, p.log)
	if err != nil {
		p.attempts++
		p.err, p.next = err, time.Now().Add(p.cfg.PrepareRetry)
		if cfg == nil { // a main that passed its configuration says itself why it stops
			p.log.Error("the sandbox cannot run scripts: refusing to serve until a later attempt succeeds",
				"error", err.Error(), "attempt", p.attempts, "next_attempt_after", p.cfg.PrepareRetry.String())
		}
		return nil, &notReady{err: err, retryAt: p.next}
	}
	if p.attempts > 0 {
		p.log.Info("the sandbox works now: serving", "failed_attempts", p.attempts)
	}
	p.ready.Store(svc)
	return svc, nil
}

// Execute is the HTTP function: POST /execute and GET /health (or /healthz). The framework hands it every path.
func Execute(w http.ResponseWriter, r *http.Request) {
	svc, err := Prepare()
	if err != nil {
		// Fail closed: no sandbox, no execution; the reason in the log and, in general terms, in the answer.
		unavailable(w, r, err)
		return
	}
	svc.ServeHTTP(w, r)
}

// unavailable answers a request while there is no service: 500 on /execute, 503 on the health check, with what
// kind of failure it is and, when a retry can help, Retry-After. The error's text stays in the log: it names
// paths and the host's settings, which are no client's business.
func unavailable(w http.ResponseWriter, r *http.Request, err error) {
	message := "the sandbox is unavailable (its set-up or start-up self-check failed); the server's log says why"
	var nr *notReady
	if errors.As(err, &nr) {
		if nr.invalidConfig {
			message = "the server's configuration is invalid; the server's log says why"
		}
		if !nr.retryAt.IsZero() { // when a new attempt may be made, in whole seconds, rounded up
			w.Header().Set("Retry-After", strconv.Itoa(max(1, int((time.Until(nr.retryAt)+time.Second-1)/time.Second))))
		}
	}
	status := http.StatusInternalServerError
	if r.URL.Path == "/health" || r.URL.Path == "/healthz" {
		status = http.StatusServiceUnavailable
	}
	writeError(w, status, apiError{Type: "InternalError", Message: message}, nil)
}
