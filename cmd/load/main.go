// Command load drives safe-py and reports what came back. It only ever sends to this machine: to a server it
// starts in this process on 127.0.0.1 (the default), or to -url, which must be a loopback address.
//
// -scenario mix (the default) sends a mix of good and hostile scripts (package workload) at a concurrency above
// the execution slots, with polite clients that honour Retry-After; it stops after -n requests or -duration.
//
// -scenario bursts sends two bursts of clients that never retry, each answered once: six scripts that spin for
// their whole wall time and ten trivial ones at concurrency 8 (the trivial ones must still be served behind a
// full house of worst-case scripts), then 96 scripts that sleep 0.5 s at concurrency 48 (those that cannot be
// served in time must be refused at once, with a Retry-After, and none may wait long).
//
//	go run ./cmd/load -n 1000 -c 12
//	go run ./cmd/load -scenario bursts
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/safe-py/safepy"
	"github.com/safe-py/safepy/internal/workload"
)

func main() {
	n := flag.Int("n", 1000, "requests to send (at most 100000)")
	c := flag.Int("c", 0, "concurrent clients (default: three times the slots)")
	duration := flag.Duration("duration", 5*time.Minute, "stop sending after this long")
	target := flag.String("url", "", "a running server on loopback (default: start one in this process)")
	pid := flag.Int("pid", 0, "with -url: the server's process id, to report its memory")
	scenario := flag.String("scenario", "mix", "mix or bursts")
	flag.Parse()
	var err error
	switch *scenario {
	case "mix":
		err = run(*n, *c, *duration, *target, *pid)
	case "bursts":
		err = bursts(*target)
	default:
		err = fmt.Errorf("unknown -scenario %q (mix or bursts)", *scenario)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		os.Exit(1)
	}
}

func run(n, clients int, duration time.Duration, target string, pid int) error {
	if n < 1 || n > 100000 || duration <= 0 || duration > time.Hour {
		return fmt.Errorf("-n must be 1..100000 and -duration at most 1h")
	}
	slots := 0
	if target == "" {
		svc, url, stop, err := serve()
		if err != nil {
			return err
		}
		defer stop()
		target, pid, slots = url, os.Getpid(), svc.Slots()
	} else if err := loopbackOnly(target); err != nil {
		return err
	}
	if clients <= 0 {
		clients = 3 * max(slots, 4)
	}

	rssBefore := rss(pid)
	mix := workload.Round()
	bodies := make([][]byte, len(workload.Mix))
	for i, s := range workload.Mix {
		bodies[i], _ = json.Marshal(map[string]string{"script": s.Source})
	}
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: clients}}

	type answer struct {
		status  int
		latency time.Duration
		wrong   string
	}
	answers := make(chan answer, n)
	jobs := make(chan int)
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				s := workload.Mix[j]
				begin := time.Now()
				req, _ := http.NewRequest(http.MethodPost, target+"/execute", strings.NewReader(string(bodies[j])))
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				a := answer{latency: time.Since(begin)}
				if err != nil {
					a.wrong = s.Name + ": " + err.Error()
					answers <- a
					continue
				}
				var body struct {
					Error struct{ Type string } `json:"error"`
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				json.Unmarshal(b, &body)
				a.status = resp.StatusCode
				if a.status != 503 && (a.status != s.Status || body.Error.Type != s.Type) {
					a.wrong = fmt.Sprintf("%s: got %d %s, want %d %s", s.Name, a.status, body.Error.Type, s.Status, s.Type)
				}
				if a.status == 503 && (body.Error.Type != "Overloaded" || resp.Header.Get("Retry-After") == "") {
					a.wrong = fmt.Sprintf("%s: a 503 that is not Overloaded with Retry-After: %s", s.Name, b)
				}
				answers <- a
				if a.status == 503 { // a polite client waits as it is told before it sends again
					secs, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
					time.Sleep(time.Duration(min(max(secs, 1), 5)) * time.Second)
				}
			}
		}()
	}
	sent := 0
send:
	for ; sent < n; sent++ {
		select {
		case jobs <- mix[sent%len(mix)]:
		case <-ctx.Done():
			break send
		}
	}
	close(jobs)
	wg.Wait()
	elapsed := time.Since(start)
	close(answers)

	byStatus := map[int]int{}
	var latencies []time.Duration
	var wrong []string
	for a := range answers {
		byStatus[a.status]++
		if a.status != 503 {
			latencies = append(latencies, a.latency)
		}
		if a.wrong != "" {
			wrong = append(wrong, a.wrong)
		}
	}
	client.CloseIdleConnections()
	runtime.GC()
	time.Sleep(500 * time.Millisecond)
	rssAfter := rss(pid)

	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	pct := func(p float64) time.Duration {
		if len(latencies) == 0 {
			return 0
		}
		return latencies[int(p*float64(len(latencies)-1))]
	}
	fmt.Printf("target            %s (slots %d, clients %d)\n", target, slots, clients)
	fmt.Printf("requests sent     %d in %s (%.1f/s)\n", sent, elapsed.Round(time.Millisecond), float64(sent)/elapsed.Seconds())
	var statuses []int
	for s := range byStatus {
		statuses = append(statuses, s)
	}
	sort.Ints(statuses)
	for _, s := range statuses {
		label := fmt.Sprint(s)
		if s == 0 {
			label = "no answer"
		}
		fmt.Printf("answers %-9s %d\n", label, byStatus[s])
	}
	fmt.Printf("wrong answers     %d (errors other than 503, lost requests, or an outcome the contract does not give)\n", len(wrong))
	for i, w := range wrong {
		if i == 10 {
			fmt.Printf("  ... and %d more\n", len(wrong)-10)
			break
		}
		fmt.Println("  " + w)
	}
	fmt.Printf("latency (non-503) p50 %s  p95 %s  max %s\n", pct(0.5).Round(time.Millisecond), pct(0.95).Round(time.Millisecond), pct(1).Round(time.Millisecond))
	if pid > 0 {
		fmt.Printf("server RSS        before %d MiB, after %d MiB\n", rssBefore>>20, rssAfter>>20)
	}
	if len(wrong) > 0 || sent != len(latencies)+byStatus[503] {
		return fmt.Errorf("%d wrong answers", len(wrong))
	}
	return nil
}

// serve starts the service in this process on 127.0.0.1, configured from the environment as the server is.
func serve() (*safepy.Service, string, func(), error) {
	cfg, err := safepy.ConfigFromEnv()
	if err != nil {
		return nil, "", nil, err
	}
	svc, err := safepy.NewService(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return nil, "", nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		svc.Close()
		return nil, "", nil, err
	}
	srv := &http.Server{Handler: svc}
	go srv.Serve(ln)
	return svc, "http://" + ln.Addr().String(), func() { srv.Close(); svc.Close() }, nil
}

// loopbackOnly refuses any target that is not this machine's loopback.
func loopbackOnly(target string) error {
	u, err := url.Parse(target)
	if err != nil || u.Scheme != "http" {
		return fmt.Errorf("-url must be http://127.0.0.1:PORT or similar: %q", target)
	}
	host := u.Hostname()
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("refusing to send load to %q: only loopback addresses are allowed", host)
	}
	return nil
}

// rss is a process's resident memory in bytes, from /proc.
func rss(pid int) int64 {
	if pid <= 0 {
		return 0
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			var kb int64
			fmt.Sscan(f[1], &kb)
			return kb << 10
		}
	}
	return 0
}

// outcome is one answer of a burst.
type outcome struct {
	kind       string // which script
	status     int
	errType    string
	retryAfter string
	waited     time.Duration
	err        error
}

// burst sends each script once, from clients that never retry, at the given concurrency.
func burst(client *http.Client, target string, scripts []workload.Script, concurrency int) []outcome {
	jobs := make(chan workload.Script)
	out := make(chan outcome, len(scripts))
	var wg sync.WaitGroup
	for i := 0; i < concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range jobs {
				body, _ := json.Marshal(map[string]string{"script": s.Source})
				begin := time.Now()
				resp, err := client.Post(target+"/execute", "application/json", strings.NewReader(string(body)))
				o := outcome{kind: s.Name, err: err}
				if err == nil {
					var e struct {
						Error struct{ Type string } `json:"error"`
					}
					b, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					json.Unmarshal(b, &e)
					o.status, o.errType, o.retryAfter = resp.StatusCode, e.Error.Type, resp.Header.Get("Retry-After")
				}
				o.waited = time.Since(begin)
				out <- o
			}
		}()
	}
	for _, s := range scripts {
		jobs <- s
	}
	close(jobs)
	wg.Wait()
	close(out)
	var all []outcome
	for o := range out {
		all = append(all, o)
	}
	return all
}

// bursts runs the two bursts and checks them against their targets.
func bursts(target string) error {
	var svc *safepy.Service
	if target == "" {
		s, url, stop, err := serve()
		if err != nil {
			return err
		}
		defer stop()
		svc, target = s, url
	} else if err := loopbackOnly(target); err != nil {
		return err
	}
	rest := func() { // each burst starts with the service at rest
		for deadline := time.Now().Add(time.Minute); svc != nil && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if ready, size := svc.WarmJails(); ready == size {
				return
			}
		}
	}
	client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	spin := workload.Script{Name: "spinner", Source: "def main():\n    while True:\n        pass\n"}
	trivial := workload.Script{Name: "trivial", Source: "def main():\n    return 1\n"}
	sleeper := workload.Script{Name: "sleeper", Source: "import time\ndef main():\n    time.sleep(0.5)\n    return 1\n"}
	if svc != nil {
		fmt.Printf("service: %d slots, waits at most %s for a slot, queue of at most %d\n", svc.Slots(), svc.QueueWait(), svc.MaxQueue())
	}
	var failures []string

	rest()
	var first []workload.Script
	for i := 0; i < 6; i++ {
		first = append(first, spin)
	}
	for i := 0; i < 10; i++ {
		first = append(first, trivial)
	}
	r1 := burst(client, target, first, 8)
	failures = append(failures, report("burst 1: 6 spinners then 10 trivial scripts, concurrency 8, no retries", r1)...)
	if n := count(r1, "trivial", 200); n < 8 {
		failures = append(failures, fmt.Sprintf("burst 1: %d of 10 trivial scripts succeeded, want at least 8", n))
	}

	rest()
	var second []workload.Script
	for i := 0; i < 96; i++ {
		second = append(second, sleeper)
	}
	r2 := burst(client, target, second, 48)
	failures = append(failures, report("burst 2: 96 scripts that sleep 0.5 s, concurrency 48, no retries", r2)...)
	if n := count(r2, "sleeper", 200); n < 24 {
		failures = append(failures, fmt.Sprintf("burst 2: %d of 96 succeeded, want at least 24", n))
	}
	for _, o := range r2 {
		if o.status != 200 && o.status != 503 {
			failures = append(failures, fmt.Sprintf("burst 2: an answer %d %s (%v), want 200 or 503", o.status, o.errType, o.err))
			break
		}
	}
	if len(failures) > 0 {
		return fmt.Errorf("targets missed:\n  %s", strings.Join(failures, "\n  "))
	}
	fmt.Println("targets met")
	return nil
}

func count(os []outcome, kind string, status int) int {
	n := 0
	for _, o := range os {
		if o.kind == kind && o.status == status {
			n++
		}
	}
	return n
}

// report prints a burst's answers and returns what breaks the rules every burst keeps: every 503 is Overloaded
// with a Retry-After, nobody waits more than 30 s, no request is lost.
func report(title string, os []outcome) []string {
	fmt.Printf("\n%s\n", title)
	type key struct {
		kind    string
		status  int
		errType string
	}
	counts := map[key]int{}
	var slowest503, slowest time.Duration
	refused, quick := 0, 0
	var failures []string
	for _, o := range os {
		counts[key{o.kind, o.status, o.errType}]++
		slowest = max(slowest, o.waited)
		if o.err != nil {
			failures = append(failures, fmt.Sprintf("%s: no answer: %v", title, o.err))
		}
		if o.status == 503 {
			slowest503 = max(slowest503, o.waited)
			refused++
			if o.waited < time.Second {
				quick++
			}
			if secs, err := strconv.Atoi(o.retryAfter); o.errType != "Overloaded" || err != nil || secs < 1 {
				failures = append(failures, fmt.Sprintf("%s: a 503 %q without a Retry-After (%q)", title, o.errType, o.retryAfter))
			}
		}
	}
	var keys []key
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].kind != keys[j].kind {
			return keys[i].kind < keys[j].kind
		}
		return keys[i].status < keys[j].status
	})
	for _, k := range keys {
		fmt.Printf("  %-8s %3d %-20s %d\n", k.kind, k.status, k.errType, counts[k])
	}
	fmt.Printf("  longest wait for an answer %s; for a 503 %s; %d of %d 503s within 1 s\n", slowest.Round(time.Millisecond),
		slowest503.Round(time.Millisecond), quick, refused)
	if slowest > 30*time.Second {
		failures = append(failures, fmt.Sprintf("%s: a request waited %s, more than 30 s", title, slowest))
	}
	return failures
}
