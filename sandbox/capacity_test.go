package sandbox

import (
	"cmp"
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// Slots: one per CPU, fewer where the memory left after what is set aside once cannot hold a jail at its limit and
// its warm jails per slot, never none.
func TestSlots(t *testing.T) {
	cpus := runtime.NumCPU()
	const mib = 1 << 20
	tests := []struct {
		name   string
		jail   int64
		mem    int64
		forked bool
		want   int
	}{
		{"memory unknown", 256 * mib, 0, true, cpus},
		{"plenty", 256 * mib, 1 << 40, true, cpus},
		{"one forked slot", 256 * mib, 256*mib + 256*mib + (256+64)*mib, true, min(cpus, 1)},
		{"two forked slots", 256 * mib, 512*mib + 2*(256+64)*mib, true, min(cpus, 2)},
		{"cold slots hold more", 256 * mib, 256*mib + 2*(256+160)*mib, false, min(cpus, 2)},
		{"too little is still one", 256 * mib, 300 * mib, true, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Slots(tt.jail, tt.mem, tt.forked); got != tt.want {
				t.Fatalf("Slots(%d MiB, %d MiB, forked=%v) = %d, want %d", tt.jail/mib, tt.mem/mib, tt.forked, got, tt.want)
			}
		})
	}
}

// All jails together, running and warm, and the fork servers they come from are capped (AllJailsMemory), so that a
// full house of scripts at their limits cannot push the machine into the OOM killer: past the cap, the kernel
// kills within the jails. Shown with a cap 150 MiB above what a runner holds at rest: one script's 200 MiB, within
// its own 256 MiB, is refused.
func TestAllJailsTogetherAreCapped(t *testing.T) {
	const fill = "def main():\n    b = bytearray(200 << 20)\n    for i in range(0, len(b), 4096):\n        b[i] = 1\n    return len(b) >> 20\n"
	for _, forked := range []bool{true, false} {
		t.Run(map[bool]string{true: "forked", false: "cold"}[forked], func(t *testing.T) {
			start := func(cap int64) *Runner {
				set := func(c *Config) { c.AllJailsMemory = cap }
				if forked {
					return newForked(t, 0, set) // its pools closed: every script forked on the spot
				}
				cfg := testConfig()
				set(&cfg)
				r, err := New(context.Background(), cfg) // no pools, no fork servers: every script in a cold jail
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { r.Close() })
				return r
			}
			// Uncapped, the script gets its 200 MiB, and shows what the runner holds at rest.
			free := start(0)
			if out, err := runWith(t, free, fill); err != nil || string(out.Result) != "200" {
				t.Fatalf("uncapped: %s %v", out.Result, err)
			}
			rest := runnerMemory(free)
			free.Close()

			capped := start(rest + 150<<20)
			_, err := runWith(t, capped, fill)
			var se *ScriptError
			if !errors.As(err, &se) || se.Limit != LimitMemory {
				t.Fatalf("capped at %d MiB (the runner held %d MiB at rest): %v, want the memory limit's error", (rest+150<<20)>>20, rest>>20, err)
			}
			// And the runner still serves within the cap.
			if out, err := runWith(t, capped, "def main():\n    return 1\n"); err != nil || string(out.Result) != "1" {
				t.Fatalf("after: %s %v", out.Result, err)
			}
		})
	}
}

// runnerMemory is what a runner's cgroup holds, its fork servers' and jails' together, less the page cache the
// kernel would reclaim under the cap.
func runnerMemory(r *Runner) int64 {
	dir := r.cgroups.Dirs()[0]
	read := func(file, key string) int64 {
		data, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			return -1
		}
		for _, line := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(line, " "); key == "" || ok && k == key {
				n, _ := strconv.ParseInt(strings.TrimSpace(cmp.Or(v, k)), 10, 64)
				return n
			}
		}
		return 0
	}
	if usage := read("memory.current", ""); usage >= 0 {
		return usage - read("memory.stat", "file")
	}
	return read("memory.usage_in_bytes", "") - read("memory.stat", "total_cache")
}
