package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// What a client that sends slowly, or never reads its answer, may cost the server. Each test attacks a real server
// process on 127.0.0.1 and measures that process alone.

// bigAnswer is a script whose answer is some 23 MiB of JSON: 1 MiB of \x01 on stdout and on stderr (JSON writes each
// byte as six) and 64 files of 128 KiB (8 MiB, in base64).
const bigAnswer = `import os
def main():
    os.write(1, b"\x01" * (1 << 20))
    os.write(2, b"\x01" * (1 << 20))
    for i in range(64):
        open("f%02d" % i, "wb").write(os.urandom(128 << 10))
    return 1
`

// dialSmall connects with a small receive buffer, so that an answer the client does not read stays on the
// server's side instead of in this machine's socket buffers.
func dialSmall(t *testing.T, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10) })
	}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func sendExecute(t *testing.T, c net.Conn, script string) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"script": script})
	if _, err := fmt.Fprintf(c, "POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body); err != nil {
		t.Fatal(err)
	}
}

// procStatus reads a field of a process's /proc/PID/status in kB.
func procStatus(t *testing.T, pid int, field string) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

func mustPost(t *testing.T, url, script string) {
	t.Helper()
	status, body, err := post(url, script, nil)
	if err != nil || status != 200 {
		t.Fatalf("%d %s %v", status, body[:min(len(body), 300)], err)
	}
}

// 24 clients that ask for a 23 MiB answer each and never read it, by POST /execute and by an MCP tool call: the
// answers are encoded to the connection as they go (/execute) or charged at what encoding them holds (/mcp), the
// memory they hold is within the budget shared with request bodies, and a client that does not read is cut off.
// Held whole in buffers, they took the server past 500 MiB (12 of them) and kept it there; /mcp's, charged at four
// times /execute's size and sent without a pace, took it from 208 to 576 MiB (8 clients that read) and held the
// budget for 58 s (8 that did not).
func TestClientsThatNeverReadCostABoundedAmount(t *testing.T) {
	for _, way := range []struct {
		name string
		send func(t *testing.T, c net.Conn, script string)
		cut  string // the log entry of an answer cut off, besides the execution entry
	}{
		{"execute", sendExecute, ""},
		{"mcp", sendMCPCall, "mcp answer not sent"},
	} {
		t.Run(way.name, func(t *testing.T) {
			s := start(t, nil)
			s.WaitHealthy(t)
			pid := s.Cmd.Process.Pid
			mustPost(t, s.URL, bigAnswer) // whatever the first big answer makes the runtime keep, before the baseline
			base := procStatus(t, pid, "VmRSS")
			addr := strings.TrimPrefix(s.URL, "http://")
			const clients = 24
			for i := 0; i < clients; i++ {
				way.send(t, dialSmall(t, addr), bigAnswer)
			}
			// Every request is answered or refused: its execution entry is logged once the answer is out or cut off
			// (an MCP call's before its answer is written, and the cut after).
			var cut, refused int
			var held []string // how long each cut answer was held: from its request's start to the cut
			count := func() {
				cut, refused, held = 0, 0, nil
				if way.cut != "" {
					cut = len(s.Entries(way.cut))
					for _, e := range s.Entries(way.cut) {
						ms, _ := e["writing_ms"].(float64)
						held = append(held, fmt.Sprintf("%.1fs", ms/1000))
					}
				}
				for _, e := range s.Entries("execution")[1:] {
					switch {
					case e["outcome"] == "Overloaded":
						refused++
					case way.cut == "" && e["answer_error"] != nil:
						cut++
						run, _ := e["total_ms"].(float64)
						latency, _ := e["httpRequest"].(map[string]any)["latency"].(string)
						d, _ := time.ParseDuration(latency)
						held = append(held, fmt.Sprintf("%.1fs", (d-time.Duration(run*float64(time.Millisecond))).Seconds()))
					}
				}
			}
			for deadline := time.Now().Add(120 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				if count(); len(s.Entries("execution")) == clients+1 && cut+refused == clients {
					break
				}
				if time.Now().After(deadline) { // a bound for a broken build only
					t.Fatalf("%d of %d requests ended: %d cut off, %d refused", len(s.Entries("execution"))-1, clients, cut, refused)
				}
			}
			peak := procStatus(t, pid, "VmHWM")
			t.Logf("server RSS %d MiB before, peak %d MiB; %d answers cut off unread (each after %v of writing, queue and run excluded), %d refused for want of room",
				base>>10, peak>>10, cut, held, refused)
			// The budget (96 MiB: one MCP answer at the caps) and what the two slots' running jails hold (about 15
			// MiB each), with the garbage collector's headroom within the heap limit, and the runtime's own; far below
			// what the answers would be whole (24 x 23 MiB).
			// Cut off at the answer's pace (5 s, and its size at 256 KiB/s, of which the kernel's buffers take half
			// a MiB), long before the server's write timeout of 60 s would end it.
			for _, h := range held {
				if d, _ := time.ParseDuration(h); d >= 30*time.Second {
					t.Errorf("an unread answer was held for %s of writing", h)
				}
			}
			if grew := (peak - base) >> 10; grew > 256 {
				t.Errorf("the server grew by %d MiB for %d clients that do not read", grew, clients)
			}
			mustPost(t, s.URL, "def main():\n    return 1\n") // and it serves on
			mustPost(t, s.URL, bigAnswer)                     // a big answer too: the budget is whole again
		})
	}
}

// sendMCPCall sends a tools/call of run_python with script, as an MCP client over Streamable HTTP would.
func sendMCPCall(t *testing.T, c net.Conn, script string) {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
		"params": map[string]any{"name": "run_python", "arguments": map[string]string{"script": script}}})
	if _, err := fmt.Fprintf(c, "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"+
		"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n%s", len(body), body); err != nil {
		t.Fatal(err)
	}
}

// Connections that announce a large body and send it a byte a second neither hold the body budget nor lock anyone
// out: bytes are counted as they arrive, and a body slower than the minimum rate is cut off. (Counted as announced,
// 33 such connections made every honest request a 503.)
func TestSlowBodiesDoNotLockOthersOut(t *testing.T) {
	s := start(t, nil)
	s.WaitHealthy(t)
	addr := strings.TrimPrefix(s.URL, "http://")
	const slow = 40
	var conns []net.Conn
	for i := 0; i < slow; i++ {
		c := dialSmall(t, addr)
		fmt.Fprintf(c, "POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{", 2<<20)
		conns = append(conns, c)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() { // a byte a second on each
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Second):
			}
			for _, c := range conns {
				c.Write([]byte(" "))
			}
		}
	}()
	for i := 0; i < 10; i++ {
		mustPost(t, s.URL, fmt.Sprintf("def main():\n    return %d\n", i))
	}
	// Each slow body is cut off: the server answers 400 and closes, a few seconds after the grace.
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func(c net.Conn) {
			defer wg.Done()
			c.SetReadDeadline(time.Now().Add(30 * time.Second)) // a bound for a broken build only
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Errorf("a slow body was not cut off: %v", err)
				return
			}
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != 400 || !strings.Contains(string(b), "slower than") {
				t.Errorf("a slow body got %d %s", resp.StatusCode, b)
			}
		}(c)
	}
	wg.Wait()
}

// At the connection cap, a connection blocked writing an answer its client does not read makes room for a new
// client like an idle one; it was never closed, so the new client was refused.
func TestUnreadAnswersMakeRoom(t *testing.T) {
	s := start(t, nil, "SAFEPY_MAX_CONNS=4")
	s.WaitHealthy(t)
	addr := strings.TrimPrefix(s.URL, "http://")
	for i := 0; i < 4; i++ {
		c := dialSmall(t, addr)
		sendExecute(t, c, bigAnswer)
		// The status line and headers: the server is writing the answer, and the client reads no more.
		if _, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil {
			t.Fatal(err)
		}
	}
	mustPost(t, s.URL, "def main():\n    return 'room'\n")
}
