package safepy

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/safe-py/safepy/internal/admission"
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
	mem := sandbox.AvailableMemory()
	if cfg.Slots <= 0 {
		// Sized for the path the configuration asks for; a host that refuses fork servers runs cold, with warm
		// jails that hold more (the start-up log says which path is in use).
		cfg.Slots = sandbox.Slots(limits.MemoryBytes, mem, cfg.Sandbox.ForkServers && cfg.Sandbox.PoolSize != 0)
	}
	if cfg.Sandbox.PoolSize < 0 {
		cfg.Sandbox.PoolSize = cfg.Slots // a warm jail for each slot: a full house of requests all start warm
	}
	if mem > 2*sandbox.ServerShare && cfg.Sandbox.AllJailsMemory == 0 {
		cfg.Sandbox.AllJailsMemory = mem - sandbox.ServerShare
	}
	gate := admission.New(admission.Config{Slots: cfg.Slots, Wait: cfg.QueueWait, Turn: limits.Wall + startupAllowance})
	cfg.QueueWait = gate.Wait()
	// The pools refill only while a slot is free and nobody waits: under saturation every CPU goes to requests.
	cfg.Sandbox.Busy = func() bool { running, waiting := gate.InUse(); return running >= cfg.Slots || waiting > 0 }
	cfg.Sandbox.Log = log
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
	// An MCP answer holds more than /execute's (mcpAnswerCost): one at the caps must fit, or no wait would help it.
	s := &Service{cfg: cfg, runner: runner, log: log, gate: gate,
		mem: budget.New(max(memoryBudget, 2*largest, mcpAnswerCost*largest), smallHold, cfg.MaxConns)}
	if s.mcp, err = s.newMCPHandler(); err != nil {
		runner.Close()
		return nil, err
	}
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
