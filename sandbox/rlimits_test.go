package sandbox

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"
)

// Where the host has no usable cgroups the jail falls back to rlimits. Prove that fallback on this host too,
// whatever mode the other tests run in.
func TestRlimitFallback(t *testing.T) {
	cfg := testConfig()
	cfg.Cgroup = "none"
	r, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Info().CgroupMode != CgroupNone {
		t.Fatalf("mode %s", r.Info().CgroupMode)
	}
	runIn := func(script string) (Outcome, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		return r.Run(ctx, []byte(script))
	}
	tests := []struct {
		name, script string
		kind         Kind
		limit        Limit
		result       string
	}{
		{"pandas imports under RLIMIT_AS", "import pandas as pd\ndef main():\n    return int(pd.DataFrame({'a': [1, 2]})['a'].sum())\n", "", "", "3"},
		{"200 MiB", "def main():\n    a = bytearray(200 << 20)\n    for i in range(0, len(a), 4096):\n        a[i] = 1\n    return len(a)\n", "", "", "209715200"},
		// Address space, not memory: 256 MiB plus AddressSpaceAllowance for what libraries reserve.
		{"memory", "def main():\n    x = bytearray(500 << 20)\n", ResourceLimitError, LimitMemory, ""},
		{"processes", "import subprocess\ndef main():\n    ps = [subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(30)']) for _ in range(100)]\n", ResourceLimitError, LimitProcesses, ""},
		{"wall time", "import time\ndef main():\n    time.sleep(60)\n", TimeoutError, LimitWall, ""},
		// The limit is the address space here, but what meminfo tells is still the memory a script may use.
		{"meminfo", "def main():\n    return int(open('/proc/meminfo').read().split()[1])\n", "", "", strconv.FormatInt(r.Limits().MemoryBytes>>10, 10)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := runIn(tt.script)
			var se *ScriptError
			if tt.kind == "" {
				if err != nil || string(out.Result) != tt.result {
					t.Fatalf("got %s, %v", out.Result, err)
				}
				return
			}
			if !errors.As(err, &se) || se.Kind != tt.kind || se.Limit != tt.limit {
				t.Fatalf("got %s, %v; want %s/%s", out.Result, err, tt.kind, tt.limit)
			}
		})
	}
	// RLIMIT_NPROC is counted per user namespace, so concurrent jails (all nobody outside) do not share it.
	t.Run("process limits are per jail", func(t *testing.T) {
		script := "import subprocess, time\ndef main():\n    ps = [subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(30)']) for _ in range(40)]\n    time.sleep(0.5)\n    return len(ps)\n"
		var wg sync.WaitGroup
		results := make([]string, 2)
		errs := make([]error, 2)
		for i := range results {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				out, err := runIn(script)
				results[i], errs[i] = string(out.Result), err
			}(i)
		}
		wg.Wait()
		for i := range results {
			if errs[i] != nil || results[i] != "40" {
				t.Errorf("jail %d: %s %v", i, results[i], errs[i])
			}
		}
	})
}
