package sandbox

import (
	"errors"
	"syscall"
	"testing"
	"time"
)

// The outcome is decided from what the Go side observed, and a limit the script ran into on the way decides over
// the time that ran out after: the answer does not depend on how fast the machine was.
func TestClassifyLimitOnTheWay(t *testing.T) {
	l := Limits{Wall: 3 * time.Second, MemoryBytes: 256 << 20, Processes: 64, CPUSeconds: 3, FileSizeMiB: 10}
	exception := []byte(`E{"kind": "exception", "type": "ValueError", "message": "ValueError: no"}`)
	for _, tt := range []struct {
		name  string
		obs   observation
		kind  Kind
		limit Limit
	}{
		{"wall time alone", observation{started: true, timedOut: true}, TimeoutError, LimitWall},
		{"wall time after the process limit", observation{started: true, timedOut: true, pidsMax: true}, ResourceLimitError, LimitProcesses},
		{"wall time after the OOM killer", observation{started: true, timedOut: true, oomKilled: true}, ResourceLimitError, LimitMemory},
		{"both: memory first", observation{started: true, timedOut: true, oomKilled: true, pidsMax: true}, ResourceLimitError, LimitMemory},
		{"CPU time alone", observation{started: true, exitCode: 128 + int(syscall.SIGXCPU)}, TimeoutError, LimitCPU},
		{"CPU time after the process limit", observation{started: true, exitCode: 128 + int(syscall.SIGXCPU), pidsMax: true}, ResourceLimitError, LimitProcesses},
		{"killed after the process limit", observation{started: true, exitCode: 128 + int(syscall.SIGKILL), pidsMax: true}, ResourceLimitError, LimitProcesses},
		{"exit after the OOM killer", observation{started: true, exitCode: 1, oomKilled: true}, ResourceLimitError, LimitMemory},
		{"an exception it raised is its own", observation{started: true, frame: exception, pidsMax: true}, ExecutionError, ""},
		{"an exit of its own", observation{started: true, exitCode: 3}, ExecutionError, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := classify(tt.obs, l, 1<<20)
			var se *ScriptError
			if !errors.As(err, &se) || se.Kind != tt.kind || se.Limit != tt.limit {
				t.Fatalf("got %v, want %s/%s", err, tt.kind, tt.limit)
			}
		})
	}
	// A supervisor that ended without a status is the sandbox's failure, unless the OOM killer took it.
	if _, _, err := classify(observation{started: true, exitCode: -1, pidsMax: true}, l, 1<<20); !errors.Is(err, ErrSandbox) {
		t.Fatalf("no exit status: %v", err)
	}
}
