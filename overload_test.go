package safepy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/safe-py/safepy/internal/proctree"
)

// newTestService starts a service of its own with the given admission settings.
func newTestService(t *testing.T, slots int, wait time.Duration) *httptest.Server {
	t.Helper()
	cfg, err := ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	cfg.Slots, cfg.QueueWait = slots, wait
	svc, err := NewService(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(svc)
	t.Cleanup(func() { ts.Close(); svc.Close() })
	return ts
}

func postTo(ctx context.Context, url, body string) (int, http.Header, []byte, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/execute", strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b, err
}

// waitFor polls cond until it holds; the bound only keeps a broken build from hanging the suite.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s (now %+v)", what, countResources())
		}
	}
}

// hostProcessesWith lists the processes of this test's servers (this process's tree) whose command line
// contains s.
func hostProcessesWith(s string) []proctree.Proc { return proctree.Live(os.Getpid(), s) }

// sleeper is a script that marks itself with token on the host's process list and sleeps.
func sleeper(token string) string {
	return scriptBody(fmt.Sprintf("import subprocess, time\ndef main():\n    subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(60)', %q])\n    time.sleep(60)\n", token))
}

// With every slot busy and a wait shorter than a turn is likely to take, a request is refused at once with the
// contract's 503 and a Retry-After. (That the refusal comes at once, not after the wait, is admission's test.)
func TestOverloaded(t *testing.T) {
	ts := newTestService(t, 1, 100*time.Millisecond)
	token := fmt.Sprintf("overload-%d", time.Now().UnixNano())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	busy := make(chan int, 1)
	go func() {
		status, _, _, _ := postTo(ctx, ts.URL, sleeper(token))
		busy <- status
	}()
	waitFor(t, "the first script to run", func() bool { return len(hostProcessesWith(token)) > 0 })

	status, header, body, err := postTo(context.Background(), ts.URL, scriptBody("def main():\n    return 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	var e struct{ Error apiError }
	json.Unmarshal(body, &e)
	if retry, err := strconv.Atoi(header.Get("Retry-After")); status != 503 || e.Error.Type != "Overloaded" || err != nil || retry < 1 {
		t.Fatalf("got %d Retry-After=%q %s", status, header.Get("Retry-After"), body)
	}
	// A tool call over /mcp is refused the same way: an error result that says when to retry.
	res, out := callRunPython(t, mcpSession(t, ts.URL), map[string]any{"script": "def main():\n    return 1\n"})
	if !res.IsError || out.Error == nil || out.Error.Type != "Overloaded" || out.Error.RetryAfterSeconds < 1 ||
		!strings.Contains(textOf(res), "retry after") {
		t.Fatalf("MCP call while overloaded: isError=%v %+v %q", res.IsError, out.Error, textOf(res))
	}
	if status := <-busy; status != 422 {
		t.Fatalf("the running script ended with %d, want 422 (timeout)", status)
	}
}

func TestQueuedRequestWaitsForASlot(t *testing.T) {
	ts := newTestService(t, 1, 30*time.Second)
	first := make(chan int, 1)
	go func() {
		status, _, _, _ := postTo(context.Background(), ts.URL, scriptBody("import time\ndef main():\n    time.sleep(1)\n    return 1\n"))
		first <- status
	}()
	time.Sleep(200 * time.Millisecond) // let the first take the slot; if it has not, the second simply goes first
	status, _, body, err := postTo(context.Background(), ts.URL, scriptBody("def main():\n    return 2\n"))
	if err != nil || status != 200 || string(body) != `{"result":2,"stdout":""}`+"\n" {
		t.Fatalf("queued request: %d %s %v", status, body, err)
	}
	if s := <-first; s != 200 {
		t.Fatalf("first request: %d", s)
	}
}

// A client that goes away takes its job with it: the jail is killed and the slot is free for the next request.
func TestClientDisconnectCancelsTheJob(t *testing.T) {
	// One slot, and a wait so that the next request may wait out the moment between the jail's death and the
	// slot's release; it would be refused if the slot stayed taken.
	ts := newTestService(t, 1, 20*time.Second)
	token := fmt.Sprintf("disconnect-%d", time.Now().UnixNano())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, _, _, err := postTo(ctx, ts.URL, sleeper(token))
		done <- err
	}()
	waitFor(t, "the script to run", func() bool { return len(hostProcessesWith(token)) > 0 })
	cancel()
	<-done
	waitFor(t, "the jail to be killed", func() bool { return len(hostProcessesWith(token)) == 0 })
	status, _, body, _ := postTo(context.Background(), ts.URL, scriptBody("def main():\n    return 'next'\n"))
	if status != 200 {
		t.Fatalf("next request: %d %s", status, body)
	}
}

// Requests that hold all of the memory budget's shared part (large answers read as slowly as the server allows,
// here one hold that takes it all) leave every other request room for a small body and a small answer: each
// connection's share of the reserve. Without the reserve, nine clients reading 15 MiB answers just fast enough made
// most honest requests 503 for as long as they read.
func TestAFullBudgetLeavesRoomForSmallRequests(t *testing.T) {
	cfg, err := ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(svc)
	t.Cleanup(func() { ts.Close(); svc.Close() })
	hog := svc.mem.NewHold()
	defer hog.Release()
	if shared, _ := svc.mem.Left(); !hog.TryGrow(shared) {
		t.Fatal("could not take the shared part")
	}
	for i := 0; i < 5; i++ {
		status, _, body, err := postTo(context.Background(), ts.URL, scriptBody(fmt.Sprintf("def main():\n    print('x' * 1000)\n    return %d\n", i)))
		if err != nil || status != 200 {
			t.Fatalf("a small request beside a full budget: %d %s %v", status, body, err)
		}
	}
	// A large one does not fit: it gets 503 and a Retry-After, never an unbounded buffer.
	status, header, _, _ := postTo(context.Background(), ts.URL, scriptBody("def main():\n    return 'a' * 500000\n"))
	if status != 503 || header.Get("Retry-After") == "" {
		t.Fatalf("a large answer with no room for it: %d", status)
	}
}
