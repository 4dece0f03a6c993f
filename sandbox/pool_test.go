package sandbox

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/safe-py/safepy/internal/reap"
	"golang.org/x/sys/unix"

	"github.com/safe-py/safepy/internal/pool"
)

// newPooled returns a runner with a pool of size, whose pool is full; its jails are forked if forked. preload, if
// given, replaces the default preload sets.
func newPooled(t *testing.T, cgroup string, size int, maxAge time.Duration, forked bool, preload ...string) *Runner {
	t.Helper()
	cfg := testConfig()
	cfg.Cgroup, cfg.PoolSize, cfg.PoolMaxAge, cfg.ForkServers = cgroup, size, maxAge, forked
	if preload != nil {
		cfg.Preload = preload
	}
	r, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if forked && r.Info().Path != "forked" {
		t.Fatalf("no fork servers: %s", r.Info().PathNote)
	}
	waitUntil(t, "the pools to fill", func() bool { ready, all := r.WarmJails(); return ready == all })
	return r
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
	}
}

func runWith(t *testing.T, r *Runner, script string) (Outcome, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return r.Run(ctx, []byte(script))
}

// A warm jail is a fresh jail with numpy and pandas already imported. Its limits count from the script's arrival,
// and it serves one script only. Checked in both enforcement modes.
// Without cgroups there are no fork servers (a forked jail's processes are found and killed through its cgroup):
// that mode runs cold only.
func TestWarmJails(t *testing.T) {
	for _, tc := range []struct {
		name, mode string
		forked     bool
	}{{"cgroups forked", "", true}, {"cgroups cold", "", false}, {"rlimits cold", "none", false}} {
		mode := tc.mode
		t.Run(tc.name, func(t *testing.T) {
			r := newPooled(t, mode, 1, time.Hour, tc.forked)
			warm := func(script string) (Outcome, error) {
				t.Helper()
				waitUntil(t, "warm jails", func() bool { ready, all := r.WarmJails(); return ready == all })
				out, err := runWith(t, r, script)
				if !out.Warm || out.Forked != tc.forked {
					t.Fatalf("the script ran warm=%v forked=%v", out.Warm, out.Forked)
				}
				return out, err
			}

			// Preloaded, and clean: the first script leaves a file, a variable and a process behind...
			// It looks at sys.modules before its own imports run: the jail had them already.
			out, err := warm(`import os, sys, subprocess
PRELOADED = ["numpy" in sys.modules, "pandas" in sys.modules]
import numpy, pandas
def main():
    open("/tmp/left", "w").write("x"); open("/sandbox/left", "w").write("x")
    os.environ["LEFT"] = "1"
    subprocess.Popen(["/usr/local/bin/python3", "-c", "import time; time.sleep(60)"])
    return PRELOADED
`)
			if err != nil || string(out.Result) != "[true, true]" {
				t.Fatalf("got %s %v", out.Result, err)
			}
			// ...and the next finds none of it. (It names no preloaded module: a plain warm jail, nothing imported.)
			out, err = warm(`import os, sys
def main():
    return [os.path.exists("/tmp/left"), os.path.exists("/sandbox/left"), "LEFT" in os.environ,
            sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "json" in sys.modules, len([m for m in sys.modules if m.startswith("pan")])]
`)
			if err != nil || string(out.Result) != "[false, false, false, [1, 2], true, 0]" {
				t.Fatalf("got %s %v", out.Result, err)
			}

			// The wall clock starts when the script arrives, not when the jail started: this jail has waited in
			// the pool for longer than the script's 2.5 s would leave of a clock started earlier.
			time.Sleep(time.Second)
			if out, err = warm("import time\ndef main():\n    time.sleep(2.5)\n    return 'in time'\n"); err != nil {
				t.Fatalf("got %s %v", out.Result, err)
			}
			// The preloaded modules count against the limit, and 200 MiB still fits beside them.
			if out, err = warm("import numpy\ndef main():\n    a = bytearray(200 << 20)\n    for i in range(0, len(a), 4096):\n        a[i] = 1\n    return len(a)\n"); err != nil {
				t.Fatalf("200 MiB in a warm jail: %s %v", out.Result, err)
			}
			var se *ScriptError
			_, err = warm("import pandas\ndef main():\n    a = bytearray(350 << 20)\n    for i in range(0, len(a), 4096):\n        a[i] = 1\n")
			if !errors.As(err, &se) || se.Limit != LimitMemory {
				t.Fatalf("300 MiB in a warm jail: %v", err)
			}
		})
	}
}

// The CPU-time limit, counted from the script's arrival, in a child process that escapes nothing.
func TestCPULimitFromArrival(t *testing.T) {
	for _, forked := range []bool{true, false} {
		t.Run(fmt.Sprint("forked=", forked), func(t *testing.T) { cpuLimitFromArrival(t, forked) })
	}
}

func cpuLimitFromArrival(t *testing.T, forked bool) {
	r := newPooled(t, "", 1, time.Hour, forked)
	out, err := runWith(t, r, "import resource  # pandas is preloaded\ndef main():\n    u = resource.getrusage(resource.RUSAGE_SELF)\n    return [resource.getrlimit(resource.RLIMIT_CPU), u.ru_utime + u.ru_stime]\n")
	if err != nil || !out.Warm {
		t.Fatalf("%s %v warm=%v", out.Result, err, out.Warm)
	}
	// The preload spent some CPU; the limit is that plus the jail's (nsjail.cfg's 3 s, or testjail's), rounded up,
	// with the kill a second later.
	var soft, hard int
	var used float64
	fields := strings.NewReplacer("[", " ", "]", " ", ",", " ").Replace(string(out.Result))
	if _, err := fmt.Sscan(fields, &soft, &hard, &used); err != nil {
		t.Fatalf("%s: %v", out.Result, err)
	}
	limit := float64(r.limits.CPUSeconds)
	if float64(soft) < limit || float64(soft) < used+limit || float64(soft) > used+limit+1 || hard != soft+1 {
		t.Fatalf("RLIMIT_CPU (%d, %d) after %.2fs of preload", soft, hard, used)
	}
}

// Jails older than the maximum age are replaced without serving, and closing the runner leaves none behind.
func TestPoolRecyclesAndCloses(t *testing.T) {
	for _, forked := range []bool{true, false} {
		t.Run(fmt.Sprint("forked=", forked), func(t *testing.T) { poolRecyclesAndCloses(t, forked) })
	}
}

func poolRecyclesAndCloses(t *testing.T, forked bool) {
	// One preload set that comes up well within the maximum age, even cold on a busy machine.
	r := newPooled(t, "", 1, 300*time.Millisecond, forked, "json")
	p := r.pools[len(r.pools)-1]
	first := p.State().Ready[0]
	waitUntil(t, "the old jail to be replaced", func() bool {
		ready := p.State().Ready
		return !first.alive() && len(ready) == 1 && ready[0] != first
	})
	last := p.State().Ready
	r.Close()
	if n, _ := r.WarmJails(); n != 0 {
		t.Fatalf("%d warm jails after Close", n)
	}
	for _, j := range last {
		if j.alive() {
			t.Fatal("a warm jail survived Close")
		}
	}
}

// What a jail holds when its script arrives, per kind of jail: it counts against the script's memory limit.
func TestBaseMemory(t *testing.T) {
	for _, forked := range []bool{true, false} {
		t.Run(fmt.Sprint("forked=", forked), func(t *testing.T) { baseMemory(t, forked) })
	}
}

func baseMemory(t *testing.T, forked bool) {
	r := newPooled(t, "", 1, time.Hour, forked)
	if r.Info().CgroupMode == CgroupNone {
		t.Skip("no cgroup to read memory from on this host") // the rlimits mode is covered by TestWarmJails
	}
	base := map[string]int64{}
	for _, tt := range []struct{ name, script string }{
		{"plain", "def main():\n    return 1\n"},
		{"numpy", "import numpy\ndef main():\n    return 1\n"},
		{"numpy+pandas", "import pandas\ndef main():\n    return 1\n"},
	} {
		waitUntil(t, "warm jails", func() bool { ready, all := r.WarmJails(); return ready == all })
		out, err := runWith(t, r, tt.script)
		if err != nil || !out.Warm || out.BaseMemory <= 0 {
			t.Fatalf("%s: %v warm=%v base=%d", tt.name, err, out.Warm, out.BaseMemory)
		}
		base[tt.name] = out.BaseMemory
		t.Logf("%s jail holds %.1f MiB when its script arrives", tt.name, float64(out.BaseMemory)/(1<<20))
	}
	if !(base["plain"] < base["numpy"] && base["numpy"] < base["numpy+pandas"]) {
		t.Fatalf("base memory %v", base)
	}
}

// A request that finds its pool empty while the pool is forking a jail takes that jail once it is ready, instead of
// forking one of its own: that one started earlier. The fork server is held stopped, so that the pool's next jail
// is still forming when the request comes.
func TestARequestWaitsForTheJailBeingForked(t *testing.T) {
	r := newPooled(t, "", 1, time.Hour, true, "json")
	p := r.pools[0]
	fs := r.forks.server(nil)
	if fs == nil {
		t.Fatal("no plain fork server")
	}
	hello := "def main():\n    return 1\n"
	reap.Stop(fs.cg)
	defer reap.Signal(fs.cg, unix.SIGCONT)
	if out, err := runWith(t, r, hello); err != nil || !out.Warm {
		t.Fatalf("the ready jail: warm=%v %v", out.Warm, err)
	}
	waitUntil(t, "the pool to fork its next jail", func() bool { return p.State().Forming == 1 })
	type result struct {
		out Outcome
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := runWith(t, r, hello)
		done <- result{out, err}
	}()
	waitUntil(t, "the request to wait for that jail", func() bool { return p.State().Waiting == 1 })
	reap.Signal(fs.cg, unix.SIGCONT)
	res := <-done
	if res.err != nil || !res.out.Warm || !res.out.Forked || string(res.out.Result) != "1" {
		t.Fatalf("warm=%v forked=%v result=%q %v; want the pool's forked jail", res.out.Warm, res.out.Forked, res.out.Result, res.err)
	}
}

// makeBare has pool i of r hold one bare jail, as it does while requests come back to back.
func makeBare(t *testing.T, r *Runner, i int) {
	t.Helper()
	p := r.pools[i]
	waitUntil(t, "a warm jail", func() bool { return p.Count() == 1 })
	p.SetBareIdle(time.Hour)
	// A request just came, and still just came however long the refill takes to look (a loaded machine may
	// take longer than seldom to get there): the pool forks its next jail bare, without depending on timing.
	p.SetLastTake(time.Now().Add(time.Hour))
	j, _ := p.Remove()
	j.discard()
	p.Poke()
	waitUntil(t, "a bare jail", func() bool {
		s := p.State()
		return len(s.Ready) == 1 && s.Bare[0]
	})
}

// restBare undoes makeBare: the pools replace bare jails again once requests stop.
func restBare(r *Runner) {
	for _, p := range r.pools {
		p.SetBareIdle(pool.Seldom)
		p.Poke()
	}
}

// While requests come back to back, the pool forks its jails bare (without prefault, which would only delay the
// request about to take them); once they stop, it replaces the bare ones by prefaulted ones, and only then counts
// itself full.
func TestBareJailsAreReplacedAtRest(t *testing.T) {
	r := newPooled(t, "", 1, time.Hour, true, "json")
	p := r.pools[0]
	p.SetLastTake(time.Now())
	p.SetBareIdle(time.Hour)
	if out, err := runWith(t, r, "def main():\n    return 1\n"); err != nil || !out.Warm {
		t.Fatalf("warm=%v %v", out.Warm, err)
	}
	waitUntil(t, "the next jail", func() bool { return p.Count() == 1 })
	bare := p.State().Bare[0]
	p.SetBareIdle(0)
	if !bare {
		t.Fatal("a jail forked right after a request's was prefaulted")
	}
	if ready, all := r.WarmJails(); ready == all {
		t.Fatal("a pool holding a bare jail counts itself full")
	}
	p.Poke()
	waitUntil(t, "the bare jail to be replaced by a prefaulted one", func() bool { return p.Settled() == 1 })
	if ready, all := r.WarmJails(); ready != all {
		t.Fatalf("%d of %d warm jails at rest", ready, all)
	}
}

// Requests that come steadily, though not back to back, keep the pool making one jail per request: a bare jail
// that waited its turn in a larger pool is not thrown away while requests still come.
func TestSteadyRequestsDoNotChurnBareJails(t *testing.T) {
	const size, requests = 4, 30
	r := newPooled(t, "", size, time.Hour, true, "json")
	fs := r.forks.server(nil)
	if fs == nil {
		t.Fatal("no plain fork server")
	}
	before := fs.forkCount()
	for i := 0; i < requests; i++ {
		if out, err := runWith(t, r, "def main():\n    return 1\n"); err != nil || !out.Forked {
			t.Fatalf("forked=%v %v", out.Forked, err)
		}
		time.Sleep(40 * time.Millisecond)
	}
	// One jail per request to refill the pool, and a few more: the last bare ones replaced at rest, and on a
	// busy machine a request that came more than bareIdle after the one before.
	waitUntil(t, "the pool at rest", func() bool { ready, all := r.WarmJails(); return ready == all })
	if forks := fs.forkCount() - before; forks > requests+size+5 {
		t.Fatalf("%d forks for %d requests with a pool of %d", forks, requests, size)
	}
}
