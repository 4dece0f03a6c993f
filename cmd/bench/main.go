// Command bench measures safe-py's latency and throughput on the contract's three examples (hello, numpy,
// pandas), side by side in one run with the floor under it:
//
//   - floor:        the same scripts run directly in nsjail, with the same config and command line, no service;
//   - service cold: the service over loopback HTTP with its fork servers and warm-jail pools off
//     (SAFEPY_POOL_SIZE=0): every request starts a fresh nsjail;
//   - service, no fork servers: the service with SAFEPY_FORK_SERVERS=off, as the release before fork servers ran:
//     warm pools refilled by starting and preloading a fresh nsjail each, cold jails otherwise;
//   - service:      the service over loopback HTTP as it runs by default: jails forked from fork servers, warm
//     pools refilled by fork.
//
// Each is measured at concurrency 1 with one request every -pace (a light load, which the pools can keep up with),
// at concurrency 1 back to back, and at concurrency 4 back to back (throughput). It prints p50, p95 and requests
// per second, the memory a request's jail held at its peak (its cgroup's), and writes an SVG chart. The three take turns, in rounds, each turn starting and ending at rest, so
// that the machine's other load weighs on all alike. Everything runs in this process and talks to 127.0.0.1 only.
//
// A fourth example, plot, reads a CSV the request sends with pandas, plots it with matplotlib and sends the PNG back
// (package workload's Plot). Beside it the bench measures the plot's own work: its main() run over and over in one
// interpreter of the runtime, with no jail and no service, which no sandbox can answer faster than.
//
//	go run ./cmd/bench -svg docs/bench.svg
package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/safe-py/safepy"
	"github.com/safe-py/safepy/internal/workload"
	"github.com/safe-py/safepy/sandbox"
)

type scenario struct {
	name        string
	concurrency int
	requests    int
	pace        time.Duration // between request starts at concurrency 1; 0 is back to back
}

// examples are the contract's three and the plot.
var examples = append(append([]workload.Script{}, workload.Examples...), workload.Plot)

// filesFor is what a request of the example sends besides its script.
func filesFor(name string) []sandbox.File {
	if name == workload.Plot.Name {
		return []sandbox.File{{Path: "data.csv", Data: []byte(workload.PlotCSV)}}
	}
	return nil
}

type result struct {
	p50, p95 time.Duration
	rps      float64
	failed   int
	peak     int64 // median of the jails' peak memory, from the service's execution log
	forked   int   // requests whose jail was forked
}

// peaks records, from the service's execution log entries, each jail's peak memory and whether it was forked.
type peaks struct {
	mu     sync.Mutex
	bytes  []int64
	forked int
}

func (p *peaks) Enabled(context.Context, slog.Level) bool { return true }
func (p *peaks) WithAttrs([]slog.Attr) slog.Handler       { return p }
func (p *peaks) WithGroup(string) slog.Handler            { return p }
func (p *peaks) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "execution" {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "jail_peak_bytes":
			p.bytes = append(p.bytes, a.Value.Int64())
		case "forked":
			if a.Value.Bool() {
				p.forked++
			}
		}
		return true
	})
	return nil
}

// take returns the median peak and the forked count since the last take.
func (p *peaks) take() (int64, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, f := p.bytes, p.forked
	p.bytes, p.forked = nil, 0
	if len(b) == 0 {
		return 0, f
	}
	sort.Slice(b, func(i, j int) bool { return b[i] < b[j] })
	return b[len(b)/2], f
}

func main() {
	n := flag.Int("n", 30, "requests per measurement at concurrency 1 (six times as many at concurrency 4)")
	pace := flag.Duration("pace", 400*time.Millisecond, "time between request starts in the paced scenario")
	svg := flag.String("svg", "", "write a chart to this file")
	flag.Parse()
	if err := run(*n, *pace, *svg); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(n int, pace time.Duration, svgPath string) error {
	if n < 5 || n > 1000 {
		return fmt.Errorf("-n must be 5..1000")
	}
	scenarios := []scenario{
		{fmt.Sprintf("c=1, one request every %s", pace), 1, n, pace},
		{"c=1, back to back", 1, n, 0},
		{"c=4, back to back", 4, 6 * n, 0},
	}
	cfg, err := safepy.ConfigFromEnv()
	if err != nil {
		return err
	}
	targets := []string{"floor", "service cold", "no fork servers", "service"}
	type runner struct {
		do     func(script []byte, files []sandbox.File) error
		settle func() // waits until the target is at rest: nothing running in the background
		done   func()
		peaks  *peaks // nil for the floor, which has no cgroup
	}
	runners := map[string]runner{}
	for _, target := range targets {
		switch target {
		case "floor":
			c := cfg.Sandbox
			c.PoolSize = 0
			r, err := sandbox.New(context.Background(), c)
			if err != nil {
				return err
			}
			path, args, err := r.ColdCommand()
			if err != nil {
				return err
			}
			runners[target] = runner{func(script []byte, files []sandbox.File) error { return floor(path, args, script, files) },
				func() {}, func() { r.Close() }, nil}
		default:
			c := cfg
			switch target {
			case "service cold":
				c.Sandbox.PoolSize = 0
			case "no fork servers":
				c.Sandbox.ForkServers = false
			}
			pk := &peaks{}
			svc, err := safepy.NewService(c, slog.New(pk))
			if err != nil {
				return err
			}
			if target == "service" && svc.JailPath() != "forked" {
				return fmt.Errorf("the service has no fork servers on this host")
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return err
			}
			srv := &http.Server{Handler: svc}
			go srv.Serve(ln)
			url := "http://" + ln.Addr().String() + "/execute"
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}}
			settle := func() {
				for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
					if ready, size := svc.WarmJails(); ready == size {
						return
					}
				}
			}
			runners[target] = runner{func(script []byte, files []sandbox.File) error { return post(client, url, script, files) }, settle,
				func() { srv.Close(); svc.Close() }, pk}
		}
		defer runners[target].done()
	}

	// The targets take turns, in rounds, so that whatever else the machine does weighs on all of them alike.
	// Each turn starts at rest (a service's pools full, as on a server between bursts) and ends at rest, so no
	// target's background work runs during another's turn.
	const rounds = 3
	results := map[string]map[string]map[string]result{} // target -> example -> scenario
	for _, target := range targets {
		results[target] = map[string]map[string]result{}
	}
	for _, ex := range examples {
		body, files := []byte(ex.Source), filesFor(ex.Name)
		for _, target := range targets {
			results[target][ex.Name] = map[string]result{}
			for i := 0; i < 3; i++ { // warm the page cache and the connections
				if err := runners[target].do(body, files); err != nil {
					return fmt.Errorf("%s %s: %w", target, ex.Name, err)
				}
			}
		}
		for _, sc := range scenarios {
			if ex.Name == workload.Plot.Name && sc.concurrency > 1 {
				continue // its target is at concurrency 1, and cold plots at concurrency 4 take the bench's time
			}
			turn := sc
			turn.requests = max(sc.requests/rounds, 1)
			lat := map[string][]time.Duration{}
			spent := map[string]time.Duration{}
			failed := map[string]int{}
			for _, target := range targets {
				if pk := runners[target].peaks; pk != nil {
					pk.take()
				}
			}
			for round := 0; round < rounds; round++ {
				for _, target := range targets {
					rn := runners[target]
					rn.settle()
					l, elapsed, errs := measure(func(b []byte) error { return rn.do(b, files) }, body, turn)
					for i, err := range errs {
						if i < 3 {
							fmt.Fprintf(os.Stderr, "%s %s %s: %v\n", target, ex.Name, sc.name, err)
						}
					}
					rn.settle()
					lat[target] = append(lat[target], l...)
					spent[target] += elapsed
					failed[target] += len(errs)
				}
			}
			for _, target := range targets {
				res := summarize(lat[target], spent[target])
				res.failed = failed[target]
				if pk := runners[target].peaks; pk != nil {
					res.peak, res.forked = pk.take()
				}
				results[target][ex.Name][sc.name] = res
				fmt.Fprintf(os.Stderr, "%-13s %-7s %-32s p50 %6.1f ms  p95 %6.1f ms  %6.1f req/s  peak %5.1f MiB  forked %d  failed %d\n",
					target, ex.Name, sc.name, msf(res.p50), msf(res.p95), res.rps, float64(res.peak)/(1<<20), res.forked, res.failed)
			}
		}
	}

	own, err := bare(cfg.Sandbox.RuntimeDir, workload.Plot, filesFor(workload.Plot.Name), n)
	if err != nil {
		return fmt.Errorf("plot without a jail: %w", err)
	}
	fmt.Fprintf(os.Stderr, "plot's main() alone, no jail: p50 %.1f ms\n", msf(own))
	report(os.Stdout, targets, scenarios, results, own)
	if svgPath != "" {
		if err := os.WriteFile(svgPath, chart(targets, scenarios, results), 0o644); err != nil {
			return err
		}
		fmt.Printf("\nchart written to %s\n", svgPath)
	}
	return nil
}

func msf(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// measure sends sc.requests scripts at sc.concurrency and returns each latency, the time it all took, and the
// failures.
func measure(do func([]byte) error, script []byte, sc scenario) ([]time.Duration, time.Duration, []error) {
	var mu sync.Mutex
	var lat []time.Duration
	var errs []error
	jobs := make(chan struct{})
	var wg sync.WaitGroup
	begin := time.Now()
	for w := 0; w < sc.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				t := time.Now()
				err := do(script)
				d := time.Since(t)
				mu.Lock()
				lat = append(lat, d)
				if err != nil {
					errs = append(errs, err)
				}
				mu.Unlock()
			}
		}()
	}
	next := time.Now()
	for i := 0; i < sc.requests; i++ {
		if sc.pace > 0 {
			time.Sleep(time.Until(next))
			next = next.Add(sc.pace)
		}
		jobs <- struct{}{}
	}
	close(jobs)
	wg.Wait()
	return lat, time.Since(begin), errs
}

func summarize(lat []time.Duration, spent time.Duration) result {
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return result{p50: lat[len(lat)/2], p95: lat[(len(lat)*95+99)/100-1], rps: float64(len(lat)) / spent.Seconds()}
}

func post(client *http.Client, url string, script []byte, files []sandbox.File) error {
	req := map[string]any{"script": string(script)}
	if len(files) > 0 {
		var fs []map[string]string
		for _, f := range files {
			fs = append(fs, map[string]string{"path": f.Path, "content": base64.StdEncoding.EncodeToString(f.Data)})
		}
		req["files"] = fs
	}
	body, _ := json.Marshal(req)
	resp, err := client.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	return nil
}

// floor runs a script in nsjail directly: the jail's command line, its descriptors, and nothing else.
func floor(path string, args []string, script []byte, files []sandbox.File) error {
	scriptR, scriptW, err := os.Pipe()
	if err != nil {
		return err
	}
	resultR, resultW, err := os.Pipe()
	if err != nil {
		return err
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	cmd := exec.Command(path, args...)
	cmd.Env = []string{}
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	cmd.ExtraFiles = []*os.File{scriptR, resultW, devnull}
	err = cmd.Start()
	scriptR.Close()
	resultW.Close()
	devnull.Close()
	if err != nil {
		scriptW.Close()
		resultR.Close()
		return err
	}
	go func() { scriptW.Write(sandbox.EncodeJob(script, files)); scriptW.Close() }()
	// The harness stops once its answer is out, and the caller takes the jail down, as the service does.
	kind, err := sandbox.ResultKind(resultR)
	resultR.Close()
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if err != nil || kind != 'R' {
		return fmt.Errorf("no result (frame %q): %v", kind, err)
	}
	return nil
}

// bare runs the script's main() n times, after three runs to warm up, in one interpreter of the runtime with no
// jail around it, in a directory holding files, and returns the median time of one main().
func bare(runtimeDir string, ex workload.Script, files []sandbox.File, n int) (time.Duration, error) {
	dir, err := os.MkdirTemp("", "safepy-bench-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f.Path), f.Data, 0o644); err != nil {
			return 0, err
		}
	}
	const driver = `import json, sys, time, types
import matplotlib.pyplot as plt
module = types.ModuleType("script")
exec(compile(sys.argv[1], "script.py", "exec"), module.__dict__)
times = []
for i in range(int(sys.argv[2]) + 3):
    t = time.perf_counter()
    module.main()
    times.append(time.perf_counter() - t)
    plt.close("all")
print(json.dumps(times[3:]))
`
	python, _ := filepath.Abs(filepath.Join(runtimeDir, "python", "bin", "python3"))
	cmd := exec.Command(python, "-I", "-c", driver, ex.Source, strconv.Itoa(n))
	cmd.Dir = dir
	// The jail's environment (nsjail.cfg's envar lines that matter here), with a config directory of its own.
	cmd.Env = []string{"MPLBACKEND=Agg", "MPLCONFIGDIR=" + filepath.Join(dir, ".matplotlib"), "OPENBLAS_NUM_THREADS=1",
		"OMP_NUM_THREADS=1", "LANG=C.UTF-8", "LD_LIBRARY_PATH=" + filepath.Join(filepath.Dir(filepath.Dir(python)), "lib")}
	out, err := cmd.Output()
	if err != nil {
		return 0, err
	}
	var secs []float64
	if err := json.Unmarshal(out, &secs); err != nil || len(secs) == 0 {
		return 0, fmt.Errorf("no timings: %q", out)
	}
	lat := make([]time.Duration, len(secs))
	for i, s := range secs {
		lat[i] = time.Duration(s * float64(time.Second))
	}
	return summarize(lat, time.Second).p50, nil
}

func report(w io.Writer, targets []string, scenarios []scenario, results map[string]map[string]map[string]result, plotAlone time.Duration) {
	fmt.Fprintf(w, "\n%-8s %-34s", "example", "scenario")
	for _, t := range targets {
		fmt.Fprintf(w, " | %-28s", t+": p50 / p95 ms, req/s")
	}
	fmt.Fprintln(w)
	for _, ex := range examples {
		for _, sc := range scenarios {
			if _, measured := results[targets[0]][ex.Name][sc.name]; !measured {
				continue
			}
			fmt.Fprintf(w, "%-8s %-34s", ex.Name, sc.name)
			for _, t := range targets {
				r := results[t][ex.Name][sc.name]
				fmt.Fprintf(w, " | %7.1f / %7.1f  %7.1f   ", msf(r.p50), msf(r.p95), r.rps)
			}
			fmt.Fprintln(w)
		}
	}
	paced, b2b, c4 := scenarios[0].name, scenarios[1].name, scenarios[2].name
	svc, cold, fl := results["service"], results["service cold"], results["floor"]
	fmt.Fprintf(w, "\nMemory a request's jail held at its peak (its cgroup's; median), MiB:\n")
	for _, ex := range examples {
		fmt.Fprintf(w, "  %-7s service cold %6.1f   service %6.1f (forked jails hold only what they did not share with their fork server)\n",
			ex.Name, float64(cold[ex.Name][b2b].peak)/(1<<20), float64(svc[ex.Name][b2b].peak)/(1<<20))
	}
	failed := 0
	for _, t := range targets {
		for _, ex := range examples {
			for _, sc := range scenarios {
				failed += results[t][ex.Name][sc.name].failed
			}
		}
	}
	fmt.Fprintf(w, "\nTargets, measured above in this one run:\n")
	fmt.Fprintf(w, "  pandas req/s at %s, service / service cold: %.1fx (target >= 8x)\n", c4,
		svc["pandas"][c4].rps/cold["pandas"][c4].rps)
	fmt.Fprintf(w, "  service pandas p50 / service hello p50 (%s): %.2fx (target <= 1.5x)\n", b2b,
		msf(svc["pandas"][b2b].p50)/msf(svc["hello"][b2b].p50))
	fmt.Fprintf(w, "  service hello p50 / floor hello p50 (%s): %.2fx (target <= 0.5x)\n", b2b,
		msf(svc["hello"][b2b].p50)/msf(fl["hello"][b2b].p50))
	nofork := results["no fork servers"]
	for _, ex := range examples {
		fmt.Fprintf(w, "  %s p50 (%s): service %.1f ms, no fork servers %.1f ms (target: no worse than without)\n", ex.Name,
			paced, msf(svc[ex.Name][paced].p50), msf(nofork[ex.Name][paced].p50))
	}
	fmt.Fprintf(w, "  service plot p50 (%s) / the plot's main() alone, over and over in one warm interpreter with no jail: "+
		"%.1f / %.1f ms = %.2fx (target <= 1.5x)\n", b2b, msf(svc["plot"][b2b].p50), msf(plotAlone),
		msf(svc["plot"][b2b].p50)/msf(plotAlone))
	fmt.Fprintf(w, "  failed requests, all targets and scenarios: %d (target 0)\n", failed)
}

// chart draws p50 latency at concurrency 1 (paced) and requests per second at concurrency 4, per example and target.
func chart(targets []string, scenarios []scenario, results map[string]map[string]map[string]result) []byte {
	colors := map[string]string{"floor": "#9e9e9e", "service cold": "#e57373", "no fork servers": "#ffb74d", "service": "#43a047"}
	var b strings.Builder
	const width, height, panelW = 900, 380, 420
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	panels := []struct {
		title string
		value func(result) float64
		unit  string
		sc    string
	}{
		{"p50 latency, ms (" + scenarios[0].name + ")", func(r result) float64 { return msf(r.p50) }, "ms", scenarios[0].name},
		{"requests per second (" + scenarios[2].name + ")", func(r result) float64 { return r.rps }, "/s", scenarios[2].name},
	}
	for pi, p := range panels {
		x0 := 40 + pi*(panelW+40)
		top, bottom := 50, 310
		var shown []workload.Script // the examples measured in the panel's scenario (plots are not run at c=4)
		for _, ex := range examples {
			if _, ok := results[targets[0]][ex.Name][p.sc]; ok {
				shown = append(shown, ex)
			}
		}
		max := 0.0
		for _, t := range targets {
			for _, ex := range shown {
				if v := p.value(results[t][ex.Name][p.sc]); v > max {
					max = v
				}
			}
		}
		fmt.Fprintf(&b, `<text x="%d" y="25" font-weight="bold">%s</text>`+"\n", x0, p.title)
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`+"\n", x0, bottom, x0+panelW-20, bottom)
		groupW := (panelW - 20) / len(examples)
		barW := (groupW - 20) / len(targets)
		for gi, ex := range shown {
			gx := x0 + gi*groupW + 10
			for ti, t := range targets {
				v := p.value(results[t][ex.Name][p.sc])
				h := int(float64(bottom-top) * v / max)
				x := gx + ti*barW
				fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="%s"/>`+"\n", x, bottom-h, barW-4, h, colors[t])
				label := fmt.Sprintf("%.0f", v)
				if v < 10 {
					label = fmt.Sprintf("%.1f", v)
				}
				fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle" font-size="10">%s</text>`+"\n", x+(barW-4)/2, bottom-h-4, label)
			}
			fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", gx+(groupW-20)/2, bottom+18, ex.Name)
		}
	}
	for i, t := range targets {
		x := 40 + i*170
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n", x, height-30, colors[t], x+18, height-20, t)
	}
	b.WriteString("</svg>\n")
	return []byte(b.String())
}
