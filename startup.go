package safepy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	"time"

	"cloud.google.com/go/compute/metadata"

	"github.com/safe-py/safepy/internal/admission"
	"github.com/safe-py/safepy/internal/budget"
	"github.com/safe-py/safepy/internal/cloudlog"
	"github.com/safe-py/safepy/sandbox"
)

// metadataWait bounds the one question start-up asks the metadata server: a slow or absent one delays the start
// by at most this, and the service then serves without trace names.
const metadataWait = 2 * time.Second

// Configure is the start-up both ways of serving share: cmd/server's main, and the function's first request under
// the Functions Framework's own server. It reads the configuration from the environment (callers keep what it
// returns: the environment is read once), finds the project for the logs' trace names, and builds the logger:
// this is the one place that builds the Cloud Logging handler, which writes one JSON object per line to out. The
// logger is returned even when the configuration is invalid, so that the caller can log why.
func Configure(ctx context.Context, out io.Writer) (Config, *slog.Logger, error) {
	cfg, err := ConfigFromEnv()
	if cfg.HeapLimit > 0 {
		debug.SetMemoryLimit(cfg.HeapLimit)
	}
	findProject(ctx, &cfg)
	log := slog.New(cloudlog.NewHandler(out, cloudlog.Options{ProjectID: cfg.ProjectID,
		Labels: map[string]string{"service": "safe-py"}}))
	level := slog.LevelInfo
	if cfg.ProjectID == "" && cfg.CloudRunService != "" {
		level = slog.LevelWarn // on Google Cloud, logs without trace names are a loss worth seeing
	}
	log.Log(ctx, level, "project for trace names", "project_id", cfg.ProjectID, "from", cfg.ProjectFrom, "note", cfg.ProjectNote)
	return cfg, log, err
}

// findProject sets the project for trace names: GOOGLE_CLOUD_PROJECT if set; else, on Google Cloud (K_SERVICE is
// set; Cloud Run sets no GOOGLE_CLOUD_PROJECT), the metadata server's answer, asked once and for at most
// metadataWait; else none.
func findProject(ctx context.Context, cfg *Config) {
	switch {
	case cfg.ProjectID != "":
		cfg.ProjectFrom = "env"
	case cfg.CloudRunService == "":
		cfg.ProjectFrom, cfg.ProjectNote = "none", "GOOGLE_CLOUD_PROJECT is unset and this is not Google Cloud (K_SERVICE is unset)"
	default:
		id, err := projectFromMetadata(ctx)
		if err != nil {
			cfg.ProjectFrom, cfg.ProjectNote = "none", err.Error()
			return
		}
		cfg.ProjectID, cfg.ProjectFrom = id, "metadata"
	}
}

// projectFromMetadata asks the metadata server (GCE_METADATA_HOST, else 169.254.169.254) for the project id.
func projectFromMetadata(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, metadataWait)
	defer cancel()
	// A client of its own: bounded, and never sent through a proxy from the environment.
	client := metadata.NewWithOptions(&metadata.Options{Client: &http.Client{Timeout: metadataWait,
		Transport: &http.Transport{DialContext: (&net.Dialer{Timeout: metadataWait}).DialContext}}})
	id, err := client.ProjectIDWithContext(ctx)
	host := cmp.Or(os.Getenv("GCE_METADATA_HOST"), "169.254.169.254")
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded):
		// Also what an absent server looks like: the library retries refused connections until the deadline.
		return "", fmt.Errorf("the metadata server (%s) did not answer with the project id within %s: %w", host, metadataWait, err)
	case err != nil:
		return "", fmt.Errorf("asking the metadata server (%s) for the project id: %w", host, err)
	case id == "":
		return "", errors.New("the metadata server answered an empty project id")
	}
	return id, nil
}

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
	def, err := sandbox.ReadDefinition(cfg.Sandbox)
	if err != nil {
		return nil, err
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
	// The sandbox's set-up (the fork servers' start and proof) and the self-check have a minute between them.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	runner, err := sandbox.New(ctx, cfg.Sandbox)
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
	if cpus := runtime.NumCPU(); cfg.Slots > cpus {
		// Jails then share CPUs: a script gets less than a CPU's worth of its wall time, and one on its way to the
		// memory or process limit can run out of time first on a busy machine (the contract promises 1 CPU).
		log.Warn("more slots than CPUs: a limit's answer can depend on load",
			"slots", cfg.Slots, "cpus", cpus)
	}
	// The largest a request can hold: its body while it is decoded, or its answer (a compacted copy of its result
	// too) at the caps.
	largest := max(cfg.MaxBodyBytes*(1+decodeCost), (&answer{}).size()+runner.MaxOutcomeBytes()+int64(runner.Config().MaxResultBytes))
	// An MCP answer holds more than /execute's (mcpAnswerBytes): one at the caps must fit, or no wait would help it.
	// At the caps, stdout and stderr are all control bytes (six each in JSON), the result all quotes (two).
	sc := runner.Config()
	mcpLargest := mcpCharge(largest, int64(6*(sc.MaxStdoutBytes+sc.MaxStderrBytes)+2*sc.MaxResultBytes)+8<<10,
		int64((sandbox.MaxOutputBytes+2)/3*4+sandbox.MaxFiles*(6*sandbox.MaxPathBytes+256)))
	s := &Service{cfg: cfg, runner: runner, log: log, gate: gate,
		mem: budget.New(max(memoryBudget, 2*largest, mcpLargest), smallHold, cfg.MaxConns)}
	if s.mcp, err = s.newMCPHandler(); err != nil {
		runner.Close()
		return nil, err
	}
	s.ready.Store(true)
	return s, nil
}
