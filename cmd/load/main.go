// Command load drives safe-py with a mix of good and hostile scripts (package workload) at a concurrency above
// its execution slots, and reports what came back. It only ever sends to this machine: to a server it starts in
// this process on 127.0.0.1 (the default), or to -url, which must be a loopback address. It stops after -n
// requests or -duration, whichever comes first.
//
//	go run ./cmd/load -n 1000 -c 12
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
	"github.com/safe-py/safepy/workload"
)

func main() {
	n := flag.Int("n", 1000, "requests to send (at most 100000)")
	c := flag.Int("c", 0, "concurrent clients (default: three times the slots)")
	duration := flag.Duration("duration", 5*time.Minute, "stop sending after this long")
	target := flag.String("url", "", "a running server on loopback (default: start one in this process)")
	pid := flag.Int("pid", 0, "with -url: the server's process id, to report its memory")
	flag.Parse()
	if err := run(*n, *c, *duration, *target, *pid); err != nil {
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
		cfg, err := safepy.ConfigFromEnv()
		if err != nil {
			return err
		}
		svc, err := safepy.NewService(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			return err
		}
		defer svc.Close()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: svc}
		go srv.Serve(ln)
		defer srv.Close()
		target, pid, slots = "http://"+ln.Addr().String(), os.Getpid(), svc.Slots()
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
