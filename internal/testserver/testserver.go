// Package testserver runs a server under test as its own process, as Cloud Run would: a port on 127.0.0.1, logs on
// stdout (parsed as JSON lines), signals to stop it. Tests of cmd/server and of the function under the Functions
// Framework's own server share it.
package testserver

import (
	"bufio"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Root is the repository's root directory.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Server is a running server process.
type Server struct {
	Cmd  *exec.Cmd
	URL  string // http://127.0.0.1:PORT
	mu   sync.Mutex
	logs []map[string]any
	raw  []string
	done chan struct{}
}

// FreePort returns a port on 127.0.0.1 that nothing listens on now.
func FreePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// Start runs argv (a wrapper's arguments, then the server's) with a clean environment: PATH, PORT, the
// repository's runtime and jail, then env (a later entry wins; an empty value reads as unset). Its stdout and
// stderr are collected. The process is killed when the test ends.
func Start(t *testing.T, argv []string, env ...string) *Server {
	t.Helper()
	root := Root()
	rt := os.Getenv("SAFEPY_RUNTIME_DIR")
	if rt == "" {
		rt = filepath.Join(root, ".runtime")
	}
	port := FreePort(t)
	cmd := exec.Command(argv[0], argv[1:]...)
	jail := os.Getenv("SAFEPY_NSJAIL_CONFIG") // the test's own TestMain may have set one fit for this machine (testjail)
	if jail == "" {
		jail = filepath.Join(root, "nsjail.cfg")
	}
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "PORT=" + port, "SAFEPY_RUNTIME_DIR=" + rt,
		"SAFEPY_NSJAIL_CONFIG=" + jail}, env...)
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &Server{Cmd: cmd, URL: "http://127.0.0.1:" + port, done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var m map[string]any
			s.mu.Lock()
			s.raw = append(s.raw, sc.Text())
			if json.Unmarshal(sc.Bytes(), &m) == nil {
				s.logs = append(s.logs, m)
			} else {
				s.logs = append(s.logs, map[string]any{"unparsed": sc.Text()})
			}
			s.mu.Unlock()
		}
		close(s.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-s.done
		cmd.Wait()
	})
	return s
}

// Done is closed when the process has closed its output (it exited).
func (s *Server) Done() <-chan struct{} { return s.done }

// WaitHealthy polls /healthz until it answers 200; the test fails if the process exits first or it takes more
// than a generous bound.
func (s *Server) WaitHealthy(t *testing.T) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if resp, err := http.Get(s.URL + "/healthz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		select {
		case <-s.done:
			t.Fatalf("the server exited: %s", strings.Join(s.Lines(), "\n"))
		default:
		}
	}
	t.Fatalf("never healthy: %s", strings.Join(s.Lines(), "\n"))
}

// WaitListening waits until the port accepts connections, without sending a request.
func (s *Server) WaitListening(t *testing.T) {
	t.Helper()
	addr := strings.TrimPrefix(s.URL, "http://")
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		select {
		case <-s.done:
			t.Fatalf("the server exited: %s", strings.Join(s.Lines(), "\n"))
		default:
		}
	}
	t.Fatalf("never listened: %s", strings.Join(s.Lines(), "\n"))
}

// Await polls until cond holds: what the server logs after it answered, or what the pipe has not carried yet,
// arrives a moment later. The bound only keeps a broken build from hanging the suite.
func (s *Server) Await(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s: %s", what, strings.Join(s.Lines(), "\n"))
		}
	}
}

// Lines returns every line of output so far.
func (s *Server) Lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string{}, s.raw...)
}

// Entries returns the log entries so far whose message is message.
func (s *Server) Entries(message string) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, m := range s.logs {
		if m["message"] == message {
			out = append(out, m)
		}
	}
	return out
}

// Exit waits for the process to end and returns its exit code.
func (s *Server) Exit(t *testing.T) int {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the server did not exit")
	}
	err := s.Cmd.Wait()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}

// Metadata is a fake of Google Cloud's metadata server on 127.0.0.1, for GCE_METADATA_HOST.
type Metadata struct {
	Host     string // host:port, for GCE_METADATA_HOST
	mu       sync.Mutex
	requests int
}

// Requests is how many requests the fake received.
func (m *Metadata) Requests() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.requests
}

// FakeMetadata serves project as the project id. A hanging one never answers (until the client gives up or the
// test ends).
func FakeMetadata(t *testing.T, project string, hanging bool) *Metadata {
	t.Helper()
	m := &Metadata{}
	release := make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		m.mu.Lock()
		m.requests++
		m.mu.Unlock()
		if hanging {
			select {
			case <-r.Context().Done():
			case <-release:
			}
			return
		}
		if r.Header.Get("Metadata-Flavor") != "Google" || r.URL.Path != "/computeMetadata/v1/project/project-id" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Metadata-Flavor", "Google")
		w.Write([]byte(project))
	}))
	t.Cleanup(ts.Close)
	t.Cleanup(func() { close(release) }) // before Close, which waits for the hanging handlers
	m.Host = strings.TrimPrefix(ts.URL, "http://")
	return m
}
