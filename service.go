package safepy

import (
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/safe-py/safepy/internal/admission"
	"github.com/safe-py/safepy/internal/budget"
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
	mcp    http.Handler   // /mcp
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
