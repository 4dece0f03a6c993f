package safepy

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/safe-py/safepy/sandbox"
)

// FunctionName is the target the function is registered under (FUNCTION_TARGET).
const FunctionName = "Execute"

// Config is the service's configuration, read once from the environment at start-up.
type Config struct {
	MaxBodyBytes   int64 // SAFEPY_MAX_BODY_BYTES
	MaxScriptBytes int   // SAFEPY_MAX_SCRIPT_BYTES
	MaxConns       int   // SAFEPY_MAX_CONNS: connections held open at once (see connlimit)

	Slots int // SAFEPY_SLOTS: jails running at once; 0 means from CPUs and memory
	// Sandbox.PoolSize is SAFEPY_POOL_SIZE: warm jails kept ready; -1 means one per slot, 0 turns the pool off.
	// QueueWait is SAFEPY_QUEUE_WAIT: the longest wait for a slot; 0 means three full turns (see admission). The
	// queue's length follows from it and the slots.
	QueueWait time.Duration

	// ProjectID names the project in the logs' trace names: GOOGLE_CLOUD_PROJECT, or, on Google Cloud without it,
	// what the metadata server says (Configure asks it). ProjectFrom says which ("env", "metadata" or "none"), and
	// ProjectNote why there is none.
	ProjectID, ProjectFrom, ProjectNote string
	// CloudRunService is K_SERVICE, which Cloud Run (and Cloud Functions) set: the sign that the metadata server is
	// there to ask.
	CloudRunService string

	Port           string        // PORT: where cmd/server listens
	LocalOnly      bool          // LOCAL_ONLY=true: cmd/server listens on 127.0.0.1 only, as the framework's runner does
	FunctionTarget string        // FUNCTION_TARGET: the function to serve; only Execute exists
	ShutdownGrace  time.Duration // SAFEPY_SHUTDOWN_GRACE: how long running executions may finish after SIGTERM
	// PrepareRetry is SAFEPY_PREPARE_RETRY: after the function's start-up failed (under the Functions Framework's
	// server), the least time before a request tries again.
	PrepareRetry time.Duration

	// HeapLimit is the Go runtime's soft memory limit for the server (runtime/debug.SetMemoryLimit), set by
	// Configure: the server's share of memory less what is not its heap. 0 when GOMEMLIMIT sets one itself.
	HeapLimit int64

	Sandbox sandbox.Config
}

// ConfigFromEnv reads the configuration from the environment, with the defaults the README's table lists.
func ConfigFromEnv() (Config, error) {
	var errs []error
	num := func(name string, def int) int {
		v := os.Getenv(name)
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			errs = append(errs, fmt.Errorf("%s must be a positive integer, not %q", name, v))
			return def
		}
		return n
	}
	str := func(name, def string) string {
		if v := os.Getenv(name); v != "" {
			return v
		}
		return def
	}
	duration := func(name string, def time.Duration) time.Duration {
		v := os.Getenv(name)
		if v == "" {
			return def
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be a positive duration such as 3s, not %q", name, v))
			return def
		}
		return d
	}
	onOff := func(name string, def bool) bool {
		switch v := os.Getenv(name); v {
		case "":
			return def
		case "on", "true", "1":
			return true
		case "off", "false", "0":
			return false
		default:
			errs = append(errs, fmt.Errorf("%s must be on or off, not %q", name, v))
			return def
		}
	}
	// For these, 0 is a setting (none), and unset means a default derived from the machine.
	orDerived := func(name string) int {
		switch v := os.Getenv(name); v {
		case "":
			return -1
		case "0":
			return 0
		}
		return num(name, 0)
	}
	runtimeDir := str("SAFEPY_RUNTIME_DIR", ".runtime")
	cfg := Config{
		MaxBodyBytes:   int64(num("SAFEPY_MAX_BODY_BYTES", 2<<20)),
		MaxScriptBytes: num("SAFEPY_MAX_SCRIPT_BYTES", 1<<20),
		MaxConns:       num("SAFEPY_MAX_CONNS", 512),
		Slots:          num("SAFEPY_SLOTS", 0),
		QueueWait:      duration("SAFEPY_QUEUE_WAIT", 0),
		ProjectID:      os.Getenv("GOOGLE_CLOUD_PROJECT"),
		Sandbox: sandbox.Config{
			RuntimeDir: runtimeDir,
			Nsjail:     str("SAFEPY_NSJAIL", filepath.Join(runtimeDir, "bin", "nsjail")),
			JailConfig: str("SAFEPY_NSJAIL_CONFIG", "nsjail.cfg"),
			// Unset, these are 0 (or ""): the sandbox's own defaults, which it owns (sandbox.Config).
			Cgroup:          str("SAFEPY_CGROUP", ""),
			MaxStdoutBytes:  num("SAFEPY_MAX_STDOUT_BYTES", 0),
			MaxStderrBytes:  num("SAFEPY_MAX_STDERR_BYTES", 0),
			MaxResultBytes:  num("SAFEPY_MAX_RESULT_BYTES", 0),
			PoolSize:        orDerived("SAFEPY_POOL_SIZE"),
			PoolMaxAge:      duration("SAFEPY_POOL_MAX_AGE", 0),
			UIDBase:         num("SAFEPY_UID_BASE", 0),
			ForkServers:     onOff("SAFEPY_FORK_SERVERS", true),
			ForkServerAge:   duration("SAFEPY_FORK_SERVER_MAX_AGE", 0),
			ForkServerForks: int64(num("SAFEPY_FORK_SERVER_MAX_FORKS", 0)),
		},
	}
	cfg.CloudRunService = os.Getenv("K_SERVICE")
	if os.Getenv("GOMEMLIMIT") == "" {
		cfg.HeapLimit = heapLimit
	}
	cfg.Port, cfg.FunctionTarget = str("PORT", "8080"), str("FUNCTION_TARGET", FunctionName)
	cfg.LocalOnly = os.Getenv("LOCAL_ONLY") == "true"
	cfg.PrepareRetry = duration("SAFEPY_PREPARE_RETRY", 10*time.Second)
	cfg.ShutdownGrace = 8 * time.Second // 0 is a setting here: no grace, running executions are killed at once
	if v := os.Getenv("SAFEPY_SHUTDOWN_GRACE"); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d >= 0 {
			cfg.ShutdownGrace = d
		} else {
			errs = append(errs, fmt.Errorf("SAFEPY_SHUTDOWN_GRACE must be a duration such as 8s, not %q", v))
		}
	}
	if cfg.FunctionTarget != FunctionName {
		errs = append(errs, fmt.Errorf("FUNCTION_TARGET is %q, but this binary serves only %q", cfg.FunctionTarget, FunctionName))
	}
	if len(errs) > 0 {
		return cfg, fmt.Errorf("configuration: %v", errs)
	}
	return cfg, nil
}

// startupAllowance is what a turn of a slot adds to the script's wall-clock limit for starting its jail (a cold
// jail that imports pandas takes some 0.3 s here, more under load).
const startupAllowance = time.Second

// heapLimit keeps the server's heap within its share: what the service holds for its clients is bounded (the
// budget for bodies and answers, and the running jails' output), and the garbage collector, which by default lets
// the heap grow to twice what is live, collects sooner rather than take more. The rest of the share is for what is
// not heap: goroutine stacks, the binary, the runtime's own.
const heapLimit = sandbox.ServerShare * 3 / 4
