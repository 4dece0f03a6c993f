package connlimit

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// serve starts a server with a Limiter of max connections; its handler blocks on requests to /block until
// unblock is closed.
func serve(t *testing.T, max int) (addr string, l *Limiter, unblock chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l = New(max)
	unblock = make(chan struct{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/block" {
			<-unblock
		}
		io.WriteString(w, "ok")
	})
	srv := &http.Server{Handler: l.Handler(h), ConnState: l.ConnState, ConnContext: l.ConnContext}
	go srv.Serve(l.Listener(ln))
	t.Cleanup(func() {
		select {
		case <-unblock:
		default:
			close(unblock)
		}
		srv.Close()
	})
	return ln.Addr().String(), l, unblock
}

// hold opens a connection and leaves it in the given state: "idle" after one request, "half" in the middle of a
// request header, "busy" inside the handler.
func hold(t *testing.T, addr, state string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	switch state {
	case "idle":
		fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(resp.Body)
	case "half":
		fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: slo")
	case "busy":
		fmt.Fprint(c, "GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
	}
	return c
}

func waitOpen(t *testing.T, l *Limiter, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		if open, _, _ := l.Counts(); open == n {
			return
		}
		if time.Now().After(deadline) {
			open, _, _ := l.Counts()
			t.Fatalf("%d connections open, want %d", open, n)
		}
	}
}

func get(addr string) (string, error) {
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get("http://" + addr + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// At the cap, idle and half-sent connections make room for a new client, oldest first.
func TestIdleAndSlowClientsMakeRoom(t *testing.T) {
	for _, state := range []string{"idle", "half"} {
		t.Run(state, func(t *testing.T) {
			addr, l, _ := serve(t, 4)
			var held []net.Conn
			for i := 0; i < 4; i++ {
				held = append(held, hold(t, addr, state))
			}
			waitOpen(t, l, 4)
			if body, err := get(addr); err != nil || body != "ok" {
				t.Fatalf("a new client at the cap: %q %v", body, err)
			}
			if _, evicted, _ := l.Counts(); evicted != 1 {
				t.Fatalf("%d evicted, want 1", evicted)
			}
			// The oldest was the one closed.
			held[0].SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := held[0].Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
				t.Fatalf("the oldest connection is still open: %v", err)
			}
		})
	}
}

// Connections serving requests are never closed to make room; a new one is refused at once instead of waiting.
func TestBusyConnectionsAreKept(t *testing.T) {
	addr, l, unblock := serve(t, 2)
	busy := []net.Conn{hold(t, addr, "busy"), hold(t, addr, "busy")}
	waitOpen(t, l, 2)
	for {
		l.mu.Lock()
		n := 0
		for _, c := range l.conns {
			n += c.busy
		}
		l.mu.Unlock()
		if n == 2 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := get(addr); err == nil {
		t.Fatal("a new connection got in although every connection is serving a request")
	}
	if _, _, refused := l.Counts(); refused != 1 {
		t.Fatalf("refused %d", refused)
	}
	close(unblock)
	for _, c := range busy {
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("a busy connection lost its answer: %v", err)
		}
	}
}
