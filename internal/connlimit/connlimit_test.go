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
	addr, l, unblock, _ = serveEntered(t, max)
	return addr, l, unblock
}

// serveEntered is serve, and a channel that receives once each time a request enters the handler.
func serveEntered(t *testing.T, max int) (addr string, l *Limiter, unblock, entered chan struct{}) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l = New(max)
	unblock = make(chan struct{})
	entered = make(chan struct{}, 100)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		switch r.URL.Path {
		case "/read": // the client sends its body slowly
			io.ReadAll(r.Body)
		case "/block": // the server works for the request: its connection is held
			release := Hold(r.Context())
			<-unblock
			release()
		case "/big": // an answer larger than the socket buffers, for a client that does not read it
			w.Write(make([]byte, 64<<20))
			return
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
	return ln.Addr().String(), l, unblock, entered
}

// hold opens a connection and leaves it in the given state: "idle" after one request, "half" in the middle of a
// request header, "body" in the middle of a request body, "writing" blocked in writing an answer it does not read,
// "busy" inside the handler, held.
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
	case "body":
		fmt.Fprint(c, "POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nsome")
	case "writing":
		fmt.Fprint(c, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
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

// At the cap, idle, half-sent and unread connections make room for a new client, oldest first.
func TestIdleAndSlowClientsMakeRoom(t *testing.T) {
	for _, state := range []string{"idle", "half", "body", "writing"} {
		t.Run(state, func(t *testing.T) {
			addr, l, _, entered := serveEntered(t, 4)
			var held []net.Conn
			for i := 0; i < 4; i++ {
				held = append(held, hold(t, addr, state))
				if state == "body" || state == "writing" { // in the handler before the next one comes: oldest first
					<-entered
				}
			}
			waitOpen(t, l, 4)
			if body, err := get(addr); err != nil || body != "ok" {
				t.Fatalf("a new client at the cap: %q %v", body, err)
			}
			if _, evicted, _ := l.Counts(); evicted != 1 {
				t.Fatalf("%d evicted, want 1", evicted)
			}
			// The oldest was the one closed.
			// (An unread answer's first bytes are in the client's buffers: reading on reaches the close.)
			held[0].SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := io.Copy(io.Discard, held[0])
			if err != nil && strings.Contains(err.Error(), "timeout") {
				t.Fatalf("the oldest connection is still open: %v", err)
			}
		})
	}
}

// Connections the server works for are never closed to make room; a new one is refused at once instead of waiting.
func TestBusyConnectionsAreKept(t *testing.T) {
	addr, l, unblock := serve(t, 2)
	busy := []net.Conn{hold(t, addr, "busy"), hold(t, addr, "busy")}
	waitOpen(t, l, 2)
	for {
		l.mu.Lock()
		n := 0
		for _, c := range l.conns {
			n += c.held
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

// At the cap, idle connections make room before a transfer under way: a client that opens connections and sends
// nothing cannot cut off a body being sent or an answer being read, however long ago they began.
func TestIdleConnectionsGoBeforeTransfers(t *testing.T) {
	for _, state := range []string{"body", "writing"} {
		t.Run(state, func(t *testing.T) {
			addr, l, _, entered := serveEntered(t, 4)
			hold(t, addr, state)
			<-entered
			for i := 0; i < 3; i++ {
				hold(t, addr, "half")
			}
			waitOpen(t, l, 4)
			for i := 0; i < 5; i++ { // new connections, each sending nothing: they make room among themselves
				hold(t, addr, "half")
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
					if _, evicted, _ := l.Counts(); evicted == i+1 {
						break
					} else if time.Now().After(deadline) {
						t.Fatalf("%d evicted, want %d", evicted, i+1)
					}
				}
			}
			l.mu.Lock()
			transfers := 0
			for _, c := range l.conns {
				transfers += c.active
			}
			l.mu.Unlock()
			if transfers != 1 {
				t.Fatal("the transfer under way was closed to make room for idle connections")
			}
		})
	}
}
