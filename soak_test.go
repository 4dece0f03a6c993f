package safepy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/safe-py/safepy/internal/proctree"
	"github.com/safe-py/safepy/internal/workload"
)

// resourceCount is what a leak would leave behind.
type resourceCount struct {
	goroutines, fds, children, jailProcesses, tempDirs, cgroups int
}

func countResources() resourceCount {
	var c resourceCount
	c.goroutines = runtime.NumGoroutine()
	fds, _ := os.ReadDir("/proc/self/fd")
	c.fds = len(fds)
	for _, p := range proctree.Descendants(os.Getpid()) {
		if p.PPID == os.Getpid() {
			c.children++
		}
		if p.Live() && p.PPID != os.Getpid() { // below nsjail: what runs in the jails
			c.jailProcesses++
		}
	}
	// Only what this process's runners made: other servers on the machine have their own.
	mine := fmt.Sprintf("safepy-%d-", os.Getpid())
	tmp, _ := os.ReadDir(os.TempDir())
	for _, e := range tmp {
		if strings.HasPrefix(e.Name(), mine) {
			c.tempDirs++
		}
	}
	runners, _ := filepath.Glob(fmt.Sprintf("/sys/fs/cgroup/*/safepy/%d-*", os.Getpid()))
	nested, _ := filepath.Glob(fmt.Sprintf("/sys/fs/cgroup/*/*/*/safepy/%d-*", os.Getpid()))
	v2, _ := filepath.Glob(fmt.Sprintf("/sys/fs/cgroup/safepy/%d-*", os.Getpid()))
	for _, dir := range append(append(runners, nested...), v2...) {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if e.IsDir() {
				c.cgroups++
			}
		}
	}
	return c
}

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// After 1,000 mixed requests, good and hostile, at a concurrency above the slots: every answer is the right one,
// and nothing is left over: goroutines, descriptors, processes, temporary directories, cgroups, memory. Counted
// twice: with the service still up and its pool of warm jails full again (the same counts as before the load),
// and after the service is closed (the same counts as before it existed).
func TestNoLeaksAfterManyRequests(t *testing.T) {
	const requests, clients = 1000, 8
	cfg, err := ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	// The slots the machine gets by default, one per CPU: more would share a CPU between jails, and a memory or
	// fork bomb given a fraction of one can run out of wall time before it reaches its limit (the contract's "1 CPU").
	// A wait long enough that nothing is refused.
	cfg.QueueWait = time.Minute
	if shared, _ := Prepare(); shared != nil { // the package's shared service: its pool counts in the baseline
		waitFor(t, "the shared service's pool to fill", func() bool { ready, size := shared.WarmJails(); return ready == size })
	}
	beforeService := settle(countResources())
	slowest := &slowestRuns{ms: map[string]float64{}}
	svc, err := NewService(cfg, slog.New(slowest))
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(svc)
	poolFull := func() bool { ready, size := svc.WarmJails(); return ready == size }
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}

	mix := workload.Round()
	bodies := make([]string, len(workload.Mix))
	for i, s := range workload.Mix {
		bodies[i] = scriptBody(s.Source)
	}
	send := func(i int) error {
		s := workload.Mix[i]
		resp, err := client.Post(ts.URL+"/execute", "application/json", strings.NewReader(bodies[i]))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var body struct{ Error apiError }
		b, _ := io.ReadAll(resp.Body)
		json.Unmarshal(b, &body)
		if resp.StatusCode != s.Status || body.Error.Type != s.Type {
			return fmt.Errorf("%s: got %d %s, want %d %s", s.Name, resp.StatusCode, b[:min(len(b), 300)], s.Status, s.Type)
		}
		return nil
	}

	send(0) // warm up the client's connection and the server's buffers
	client.CloseIdleConnections()
	ts.CloseClientConnections()
	waitFor(t, "the pool to fill", poolFull)
	before, heapBefore := settle(countResources()), heapInUse()

	jobs := make(chan int)
	errs := make(chan error, requests)
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				if err := send(i); err != nil {
					errs <- err
				}
			}
		}()
	}
	for n := 0; n < requests; n++ {
		jobs <- mix[n%len(mix)]
	}
	close(jobs)
	wg.Wait()
	close(errs)
	failures := 0
	for err := range errs {
		if failures++; failures <= 10 {
			t.Error(err)
		}
	}
	// How close the limits' answers came to the wall time: the margin a slower machine eats into.
	t.Logf("slots %d; slowest jail run by outcome: %s", svc.Slots(), slowest)
	if failures > 0 {
		t.Fatalf("%d of %d requests got a wrong answer", failures, requests)
	}

	client.CloseIdleConnections()
	ts.CloseClientConnections()
	var after resourceCount
	waitFor(t, "resources to return to where they were with the pool full", func() bool {
		after = countResources()
		return poolFull() && after.goroutines <= before.goroutines && after.fds <= before.fds &&
			after.children <= before.children && after.jailProcesses <= before.jailProcesses &&
			after.tempDirs <= before.tempDirs && after.cgroups <= before.cgroups
	})
	heapAfter := heapInUse()
	t.Logf("before %+v heap %d KiB; after %+v heap %d KiB", before, heapBefore>>10, after, heapAfter>>10)
	if heapAfter > heapBefore+8<<20 {
		t.Fatalf("heap grew from %d KiB to %d KiB", heapBefore>>10, heapAfter>>10)
	}

	ts.Close()
	svc.Close()
	waitFor(t, fmt.Sprintf("resources to return to where they were before the service (%+v)", beforeService), func() bool {
		after = countResources()
		// (The package's shared service, with its own warm jails, is in both counts.)
		return after.goroutines <= beforeService.goroutines && after.fds <= beforeService.fds &&
			after.children <= beforeService.children && after.jailProcesses <= beforeService.jailProcesses &&
			after.tempDirs <= beforeService.tempDirs && after.cgroups <= beforeService.cgroups
	})
	t.Logf("before the service %+v; after closing it %+v", beforeService, after)
}

// slowestRuns is a log handler that keeps the longest run_ms of the service's request entries, by outcome and
// limit.
type slowestRuns struct {
	mu sync.Mutex
	ms map[string]float64
}

func (h *slowestRuns) Enabled(context.Context, slog.Level) bool { return true }
func (h *slowestRuns) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *slowestRuns) WithGroup(string) slog.Handler            { return h }
func (h *slowestRuns) Handle(_ context.Context, r slog.Record) error {
	var outcome, limit string
	run := -1.0
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "outcome":
			outcome = a.Value.String()
		case "limit":
			limit = a.Value.String()
		case "run_ms":
			run = a.Value.Float64()
		}
		return true
	})
	if outcome == "" || run < 0 {
		return nil
	}
	key := strings.TrimSuffix(outcome+" "+limit, " ")
	h.mu.Lock()
	h.ms[key] = max(h.ms[key], run)
	h.mu.Unlock()
	return nil
}

func (h *slowestRuns) String() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	keys := slices.Sorted(maps.Keys(h.ms))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %.0f ms", k, h.ms[k])
	}
	return strings.Join(parts, ", ")
}

// settle waits briefly for goroutines of finished connections to end, so the baseline is not inflated.
func settle(c resourceCount) resourceCount {
	for i := 0; i < 100; i++ {
		time.Sleep(10 * time.Millisecond)
		n := countResources()
		if n == c {
			return n
		}
		c = n
	}
	return c
}
