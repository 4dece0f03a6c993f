package sandbox

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/safe-py/safepy/internal/proctree"
	"github.com/safe-py/safepy/internal/reap"
)

// The tests of what only the fork path has. Every isolation, hostile and limit test runs on both paths
// (onBothPaths); these are about the fork servers themselves.

// newForked returns a runner with fork servers, and its pools off unless pool > 0, so that every request is forked
// on the spot.
func newForked(t *testing.T, pool int, set func(*Config)) *Runner {
	t.Helper()
	cfg := testConfig()
	cfg.ForkServers, cfg.PoolSize = true, max(pool, 1)
	if set != nil {
		set(&cfg)
	}
	r, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if r.Info().Path != "forked" {
		t.Fatalf("no fork servers: %s", r.Info().PathNote)
	}
	if pool == 0 {
		for _, p := range r.pools {
			p.Close()
		}
	}
	return r
}

// The seccomp filter a forked jail runs under is, byte for byte, the one nsjail built from nsjail.cfg for a cold
// jail; under it is only the fork server's own, which refuses a subset of what it refuses.
func TestForkedJailHasTheColdSeccompFilter(t *testing.T) {
	r := newForked(t, 0, nil)
	cold, err := r.coldSeccompProgram(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	token := fmt.Sprintf("seccomp-%d", time.Now().UnixNano())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Run(ctx, []byte(fmt.Sprintf("import subprocess, time\ndef main():\n    subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(30)', %q])\n    time.sleep(30)\n", token)))
	}()
	defer func() { cancel(); <-done }()
	var procs []proctree.Proc
	waitUntil(t, "the forked script to run", func() bool { procs = proctree.Live(os.Getpid(), token); return len(procs) == 1 })
	filters, err := seccompFilters(procs[0].PID)
	if err != nil {
		t.Fatal(err)
	}
	if len(filters) != 2 {
		t.Fatalf("%d filters in a forked jail, want the jail's and, under it, the fork server's", len(filters))
	}
	server, jail := filters[0], filters[1] // oldest first
	if !bytes.Equal(jail, cold) {
		t.Fatalf("a forked jail's filter (%d bytes) is not the cold jail's (%d bytes)", len(jail), len(cold))
	}
	if bytes.Equal(server, cold) || len(server) == 0 {
		t.Fatal("the fork server's own filter is the jail's: it could not build a jail")
	}
	checkForkServerFilter(t, server, jail)
}

// The fork server is single-threaded, not dumpable (its /proc files belong to root), and runs as the block's
// reserved uid, never as a jail's.
func TestForkServerProcess(t *testing.T) {
	r := newForked(t, 0, nil)
	for _, s := range r.forks.slots {
		fs := s.cur
		pid, err := onlyChild(fs.cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(status), "\nThreads:\t1\n") {
			t.Errorf("fork server %v is not single-threaded:\n%s", s.preload, status)
		}
		if !strings.Contains(string(status), fmt.Sprintf("\nUid:\t%d\t", r.uids.Base)) {
			t.Errorf("fork server %v does not run as the block's first uid %d", s.preload, r.uids.Base)
		}
		if st, err := os.Stat(fmt.Sprintf("/proc/%d/environ", pid)); err != nil || statUID(st) != 0 {
			t.Errorf("fork server %v is dumpable (its /proc files are not root's)", s.preload)
		}
	}
}

// Nothing seeded in the fork server is shared between requests: 16 requests, back to back and concurrent, each
// draw from every generator a script would use, and no two draws agree.
func TestNoRandomStateIsShared(t *testing.T) {
	const script = `import os, random, tempfile, uuid
import numpy as np, pandas
def main():
    return [random.random(), float(np.random.rand()), float(np.random.default_rng().random()), str(uuid.uuid4()),
            os.path.basename(tempfile.NamedTemporaryFile(dir="/tmp").name), os.urandom(8).hex(),
            str(pandas.Series([1, 2, 3]).sample(frac=1).tolist()) + str(np.random.randint(1 << 30))]
`
	onBothPaths(t, func(t *testing.T) {
		for _, mode := range []string{"back to back", "concurrent"} {
			t.Run(mode, func(t *testing.T) {
				results := make([][]any, 16)
				// Cold jails import pandas each on their own CPU time: sixteen at once on two cores would run them
				// out of their wall time. Forked ones start with it imported, and run sixteen at once.
				at := make(chan struct{}, 16)
				if runner == coldRunner {
					at = make(chan struct{}, 4)
				}
				var wg sync.WaitGroup
				for i := range results {
					do := func(i int) {
						defer wg.Done()
						at <- struct{}{}
						defer func() { <-at }()
						ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
						defer cancel()
						out, err := runner.Run(ctx, []byte(script))
						if err != nil {
							t.Errorf("request %d: %v", i, err)
							return
						}
						json.Unmarshal(out.Result, &results[i])
					}
					wg.Add(1)
					if mode == "concurrent" {
						go do(i)
					} else {
						do(i)
					}
				}
				wg.Wait()
				for k, name := range []string{"random", "numpy legacy", "default_rng", "uuid4", "tempfile name", "os.urandom", "numpy randint"} {
					if k == 6 {
						continue // the shuffle of three items repeats by chance; randint is in the same value
					}
					seen := map[string]int{}
					for i, r := range results {
						if len(r) != 7 {
							t.Fatalf("request %d: %v", i, r)
						}
						v := fmt.Sprint(r[k])
						if j, dup := seen[v]; dup {
							t.Errorf("%s: requests %d and %d drew the same %s", name, j, i, v)
						}
						seen[v] = i
					}
				}
			})
		}
	})
}

// A script has the same memory whichever way its jail was made: cold or forked, warm (prefaulted, or bare) or made
// on the spot. What a fork server preloaded is charged to the fork server, and its children's limit is that much
// smaller; the copies a child makes of the fork server's pages, charged to the child on top, are made room for
// (forkedLimits). Measured, not assumed: for a script of each preload set, how much of its own data it can
// fill before its jail is killed, on every way a jail is made, against a fresh cold jail's, within
// fillTolerance. And, as before: a pandas script that fills 200 MiB succeeds and one that fills 240 MiB is
// refused on every way.
func TestSameMemoryOnEveryPath(t *testing.T) {
	cold := newPooled(t, "", 0, time.Hour, false)
	// Memory is what is measured here: a fresh cold jail imports pandas and matplotlib and draws on its script's
	// time, a good part of the 3 s wall clock on a busy machine, and must not run out of it. (This runner has no
	// pools and no fork servers: nothing but Run reads its limits.)
	cold.limits.Wall = 2 * time.Minute
	ways := []struct {
		name         string
		r            *Runner
		forked, warm bool
		bare         bool
	}{
		{"cold", cold, false, false, false},
		{"cold warm", newPooled(t, "", 1, time.Hour, false), false, true, false},
		{"forked", newForked(t, 0, nil), true, false, false},
		{"forked warm", newPooled(t, "", 1, time.Hour, true), true, true, false},
		{"forked bare", newPooled(t, "", 1, time.Hour, true), true, true, true},
	}
	run := func(t *testing.T, i int, script string) (Outcome, error) {
		t.Helper()
		w := ways[i]
		if w.warm {
			waitUntil(t, "warm jails", func() bool { ready, all := w.r.WarmJails(); return ready == all })
		}
		if w.bare {
			makeBare(t, w.r, w.r.preloadIndex([]byte(script)))
			defer restBare(w.r)
		}
		out, err := runWith(t, w.r, script)
		if out.Forked != w.forked || out.Warm != w.warm {
			t.Fatalf("%s: ran forked=%v warm=%v", w.name, out.Forked, out.Warm)
		}
		return out, err
	}

	const draw = "    fig, ax = plt.subplots()\n    ax.plot([1, 2, 3], [2, 4, 1])\n    fig.savefig('plot.png')\n    plt.close(fig)\n"
	for _, set := range []struct {
		name, imports, first string
	}{
		{"plain", "", ""},
		{"numpy", "import numpy\n", ""},
		{"numpy+pandas", "import pandas\n", ""},
		// The plotting jail holds pandas too (its preload set is numpy, pandas and matplotlib): a plot script that
		// did not import pandas would have pandas' 25 MiB more in a fresh cold jail, the one jail that imports
		// only what its script does.
		{"matplotlib", "import pandas, matplotlib.pyplot as plt\n", draw},
	} {
		t.Run(set.name, func(t *testing.T) {
			script := fillScript(set.imports, set.first)
			fills := make([]int, len(ways))
			for i, w := range ways {
				out, err := run(t, i, script)
				var se *ScriptError
				if !errors.As(err, &se) || se.Limit != LimitMemory {
					t.Fatalf("%s: %v, want the memory limit (stderr: %s)", w.name, err, out.Stderr)
				}
				fills[i] = lastNumber(out.Stdout)
				t.Logf("%-11s filled %3d MiB (base %.1f MiB, peak %.1f MiB)", w.name, fills[i],
					float64(out.BaseMemory)/(1<<20), float64(out.PeakMemory)/(1<<20))
			}
			for i, w := range ways[1:] {
				if d := fills[i+1] - fills[0]; d < -fillTolerance || d > fillTolerance {
					t.Errorf("%s: %d MiB filled, cold %d MiB: more than %d MiB apart", w.name, fills[i+1], fills[0], fillTolerance)
				}
			}
		})
	}

	for _, tt := range []struct {
		mib  int
		fits bool
	}{{200, true}, {240, false}} {
		script := fmt.Sprintf("import pandas\ndef main():\n    a = bytearray(%d << 20)\n    for i in range(0, len(a), 4096):\n        a[i] = 1\n    return len(a)\n", tt.mib)
		for i, w := range ways {
			out, err := run(t, i, script)
			var se *ScriptError
			if tt.fits && err != nil || !tt.fits && !(errors.As(err, &se) && se.Limit == LimitMemory) {
				t.Errorf("pandas and %d MiB, %s: %v (want fits=%v)", tt.mib, w.name, err, tt.fits)
			}
			t.Logf("%d MiB %s: base %.1f MiB, peak %.1f MiB", tt.mib, w.name, float64(out.BaseMemory)/(1<<20), float64(out.PeakMemory)/(1<<20))
		}
	}
}

// fillTolerance is how far apart, in MiB, two ways of making a jail may be in what a script fills. The fork path
// differs from the cold one in what it holds besides the script's data (a supervisor process, three processes'
// page tables, copies the jail's own processes make before the script starts), by 1 to 2 MiB each way (README,
// "Memory, precisely").
const fillTolerance = 4

// fillScript is a script that does what imports and first say, then fills memory in 1 MiB chunks, writing every
// page of them (so that each is charged), and prints the running total after each, flushed: once its jail is
// killed for its memory, the last number it printed is how much of its own data it held.
func fillScript(imports, first string) string {
	return imports + "import sys\ndef main():\n" + first +
		"    chunks = []\n    while True:\n        chunk = bytearray(1 << 20)\n" +
		"        for i in range(0, len(chunk), 4096):\n            chunk[i] = 1\n" +
		"        chunks.append(chunk)\n        sys.stdout.write('%d\\n' % len(chunks))\n        sys.stdout.flush()\n"
}

// lastNumber is the last whole line of stdout that is a number (0 if none is).
func lastNumber(stdout string) int {
	lines := strings.Split(stdout, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if n, err := strconv.Atoi(lines[i]); err == nil && (i < len(lines)-1 || strings.HasSuffix(stdout, "\n")) {
			return n
		}
	}
	return 0
}

// A fork server is replaced after its maximum number of forks and after its maximum age, and when it dies, with
// requests going the cold way until its replacement is up. A replaced one is gone once its children are.
func TestForkServersAreReplaced(t *testing.T) {
	r := newForked(t, 0, func(c *Config) { c.ForkServerForks = 3 })
	hello := "def main():\n    return 1\n"
	slot := r.forks.slots[0]
	first := slot.cur
	for i := 0; i < 6; i++ {
		out, err := runWith(t, r, hello)
		if err != nil {
			t.Fatal(err)
		}
		_ = out
	}
	waitUntil(t, "the fork server to be replaced after 3 forks", func() bool {
		slot.mu.Lock()
		defer slot.mu.Unlock()
		return slot.cur != first && slot.cur != nil
	})
	waitUntil(t, "the old fork server to end", func() bool { return !first.alive() })

	// Killed: requests go cold, and a new one comes.
	second := slot.cur
	second.cmd.Process.Kill()
	<-second.done
	out, err := runWith(t, r, hello)
	if err != nil || out.Forked {
		t.Fatalf("with its fork server dead, a request: forked=%v %v", out.Forked, err)
	}
	waitUntil(t, "a new fork server", func() bool {
		slot.mu.Lock()
		defer slot.mu.Unlock()
		return slot.cur != nil && slot.cur != second && slot.cur.alive()
	})
	if out, err := runWith(t, r, hello); err != nil || !out.Forked {
		t.Fatalf("after the restart: forked=%v %v", out.Forked, err)
	}

	// Too old: replaced too.
	slot.mu.Lock()
	third := slot.cur
	third.born = time.Now().Add(-time.Hour)
	slot.mu.Unlock()
	runWith(t, r, hello)
	waitUntil(t, "the old fork server to be replaced", func() bool { return !third.alive() })
}

// A request in flight when its fork server dies gets the sandbox's error, not a script's.
func TestForkServerDeathIsTheSandboxs(t *testing.T) {
	r := newForked(t, 0, nil)
	fs := r.forks.slots[0].cur
	go func() {
		time.Sleep(500 * time.Millisecond)
		fs.cmd.Process.Kill()
		reap.KillAll(fs.cg)
	}()
	_, err := r.Run(context.Background(), []byte("import time\ndef main():\n    time.sleep(2)\n"))
	if !errors.Is(err, ErrSandbox) {
		t.Fatalf("got %v, want a sandbox failure", err)
	}
}

// Where the fork path cannot be had (here: a fork server that cannot start), the runner says why and runs every
// request cold.
func TestFallbackToCold(t *testing.T) {
	cfg := testConfig()
	cfg.ForkServers, cfg.PoolSize = true, 1
	cfg.Preload = []string{"numpy", "no_such_module_safepy"}
	r, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if info := r.Info(); info.Path != "cold" || !strings.Contains(info.PathNote, "fork server") {
		t.Fatalf("path %q, note %q", info.Path, info.PathNote)
	}
	out, err := runWith(t, r, "def main():\n    return 7\n")
	if err != nil || string(out.Result) != "7" || out.Forked {
		t.Fatalf("%s %v forked=%v", out.Result, err, out.Forked)
	}
}

// Close stops the fork servers and leaves nothing behind: no process, no cgroup, no file.
func TestCloseLeavesNothing(t *testing.T) {
	cfg := testConfig()
	cfg.ForkServers, cfg.PoolSize = true, 1
	r, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := runWith(t, r, "def main():\n    return 1\n"); err != nil {
		t.Fatal(err)
	}
	dirs := []string{r.harnessDir}
	dirs = append(dirs, r.cgroups.Dirs()...)
	var pids []int
	for _, s := range r.forks.slots {
		pids = append(pids, s.cur.cmd.Process.Pid)
	}
	r.Close()
	for _, d := range dirs {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is left", d)
		}
	}
	for _, pid := range pids {
		if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
			if st, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat")); !strings.Contains(string(st), ") Z") {
				t.Errorf("fork server nsjail %d is still running", pid)
			}
		}
	}
}

func statUID(st os.FileInfo) uint32 { return st.Sys().(*syscall.Stat_t).Uid }

// A script's jail (and so its memory: what the fork server holds is taken off a forked jail's limit) is chosen by
// what it imports, never by a name in a comment or a string.
func TestImportsChooseTheJail(t *testing.T) {
	for _, tt := range []struct {
		source string
		want   int
	}{
		{"def main(): return 1", 0},
		{"import numpy as np", 1},
		{"def main():\n    import os, pandas as pd\n", 2},
		{"from matplotlib import pyplot", 3},
		{"import matplotlib.pyplot as plt", 3},
		{"# pandas and matplotlib are not used here\ndef main(): return 'matplotlib'", 0},
		{"x = 'import pandas'", 0},
		{"import numpyx", 0},
	} {
		if got := forkedRunner.preloadIndex([]byte(tt.source)); got != tt.want {
			t.Errorf("%q: preload set %d, want %d", tt.source, got, tt.want)
		}
	}
	r := newForked(t, 0, nil)
	out, err := runWith(t, r, "# pandas, numpy and matplotlib: none of them\ndef main():\n    a = bytearray(230 << 20)\n    for i in range(0, len(a), 4096):\n        a[i] = 1\n    return len(a)\n")
	if err != nil || !out.Forked {
		t.Fatalf("230 MiB with a comment that names packages, forked=%v: %v", out.Forked, err)
	}
}

// heldBy lists what a fork server holds on the host: its cgroup's directories (one per hierarchy) and the links in
// this process's /proc/self/fd of its control socket and log pipe.
func heldBy(t *testing.T, fs *forkServer) (dirs []string, links []string) {
	t.Helper()
	dirs = append(dirs, fs.cg.Dirs()...)
	for _, conn := range []syscall.Conn{fs.ctl, fs.logs.f} {
		rc, err := conn.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		rc.Control(func(fd uintptr) {
			link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
			if err != nil {
				t.Fatal(err)
			}
			links = append(links, link)
		})
	}
	return dirs, links
}

// stillHeld reports what of dirs and links is still there.
func stillHeld(dirs, links []string) []string {
	var left []string
	for _, d := range dirs {
		if _, err := os.Stat(d); err == nil {
			left = append(left, d)
		}
	}
	fds, _ := os.ReadDir("/proc/self/fd")
	for _, fd := range fds {
		if link, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && slices.Contains(links, link) {
			left = append(left, link)
		}
	}
	return left
}

// A fork server that dies (here: killed from the host) is released at once, with no request to notice it: its
// cgroups, its control socket and its log pipe; a replacement takes its place. Close then leaves nothing of any
// fork server it ever started.
func TestADeadForkServerIsReleasedAtOnce(t *testing.T) {
	r := newForked(t, 0, nil)
	for _, slot := range r.forks.slots {
		fs := slot.cur
		dirs, links := heldBy(t, fs)
		if len(dirs) == 0 || len(stillHeld(dirs, links)) != len(dirs)+2 {
			t.Fatalf("before: %v of %v %v", stillHeld(dirs, links), dirs, links)
		}
		python, err := onlyChild(fs.cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		syscall.Kill(python, syscall.SIGKILL)
		waitUntil(t, "the dead fork server's cgroups, socket and pipe to be released", func() bool {
			return len(stillHeld(dirs, links)) == 0
		})
		waitUntil(t, "its replacement", func() bool {
			slot.mu.Lock()
			defer slot.mu.Unlock()
			return slot.cur != nil && slot.cur != fs && slot.cur.alive()
		})
	}
	if out, err := runWith(t, r, "import pandas\ndef main():\n    return 1\n"); err != nil || !out.Forked {
		t.Fatalf("after the replacement: forked=%v %v", out.Forked, err)
	}
	var dirs, links []string
	for _, slot := range r.forks.slots {
		d, l := heldBy(t, slot.cur)
		dirs, links = append(dirs, d...), append(links, l...)
	}
	r.Close()
	if left := stillHeld(dirs, links); len(left) > 0 {
		t.Fatalf("after Close: %v", left)
	}
}

// What the sandbox works around goes to the logger in its Config (the service's), not to the process's default:
// under the Functions Framework's own server, where nothing set the default, those lines were plain text.
func TestTheSandboxLogsWhereItIsTold(t *testing.T) {
	var logs syncBuffer
	r := newForked(t, 0, func(c *Config) { c.Log = slog.New(slog.NewJSONHandler(&logs, nil)) })
	// The last fork server dies, and its replacement cannot come up: it would preload a module that is not there.
	slot := r.forks.slots[len(r.forks.slots)-1]
	slot.mu.Lock()
	slot.preload = []string{"no_such_module_for_this_test"}
	fs := slot.cur
	slot.mu.Unlock()
	python, err := onlyChild(fs.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	syscall.Kill(python, syscall.SIGKILL)
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(logs.String(), "a fork server could not be started") {
		if time.Now().After(deadline) {
			t.Fatalf("nothing logged to the runner's logger: %q", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if out, err := runWith(t, r, "def main():\n    return 1\n"); err != nil || string(out.Result) != "1" {
		t.Fatalf("%s %v", out.Result, err)
	}
}

// syncBuffer is a bytes.Buffer the sandbox's goroutines and the test may use at once.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
