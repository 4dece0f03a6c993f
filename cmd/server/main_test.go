package main

import (
	"bufio"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/safe-py/safepy/internal/proctree"
	"github.com/safe-py/safepy/internal/testjail"
	"github.com/safe-py/safepy/internal/testserver"
)

// The version line runtime/install.sh writes for the interpreter it copied.
var supportedPython = regexp.MustCompile(`(^|; )python 3\.1[0-3]\.\d+;`)

// These tests build the real binary and run it as Cloud Run would: a process with a port, logs on stdout, and
// SIGTERM to stop it.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "safepy-bin-")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "safe-py")
	// What a server leaves behind when it exits is adopted by this process, so it is still counted as the
	// server's (see jailProcesses).
	if err := proctree.BecomeSubreaper(); err != nil {
		panic(err)
	}
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building the server: %v\n%s", err, out)
		os.Exit(1)
	}
	// The jail definition for this machine (testjail), which testserver passes to every server it starts.
	rt := cmp.Or(os.Getenv("SAFEPY_RUNTIME_DIR"), filepath.Join(testserver.Root(), ".runtime"))
	cfg, note, err := testjail.Config(filepath.Join(testserver.Root(), "nsjail.cfg"), rt, dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "measuring the machine: %v\n", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "server tests: %s\n", note)
	os.Setenv("SAFEPY_NSJAIL_CONFIG", cfg)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// start runs the server, wrapped in wrap, with env added to a clean environment pointing at the repository's
// runtime and jail, and a project for trace names.
func start(t *testing.T, wrap []string, env ...string) *testserver.Server {
	t.Helper()
	return testserver.Start(t, append(append([]string{}, wrap...), binary), append([]string{"GOOGLE_CLOUD_PROJECT=test-project"}, env...)...)
}

func post(url, script string, header map[string]string) (int, string, error) {
	body, _ := json.Marshal(map[string]string{"script": script})
	req, _ := http.NewRequest("POST", url+"/execute", strings.NewReader(string(body)))
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// The logs, parsed from the real process's stdout: one JSON object per line, in Cloud Logging's shape, with the
// request's trace, and never the script, its output or its result.
func TestLogs(t *testing.T) {
	s := start(t, nil)
	s.WaitHealthy(t)
	script := "# SOURCE-MARKER\ndef main():\n    print('OUTPUT-MARKER')\n    return 'RESULT-MARKER'\n"
	status, body, err := post(s.URL, script, map[string]string{
		"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
	if err != nil || status != 200 || !strings.Contains(body, "RESULT-MARKER") {
		t.Fatalf("%d %s %v", status, body, err)
	}
	post(s.URL, "def main(:\n", map[string]string{"X-Cloud-Trace-Context": "105445aa7843bc8bf206b12000100000/1;o=1"})
	s.Cmd.Process.Signal(syscall.SIGTERM)
	if code := s.Exit(t); code != 0 {
		t.Fatalf("exit %d", code)
	}

	for _, line := range s.Lines() {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Errorf("not a JSON object: %q", line)
			continue
		}
		if _, err := time.Parse(time.RFC3339Nano, fmt.Sprint(m["time"])); err != nil || m["severity"] == nil || m["message"] == nil {
			t.Errorf("missing severity, message or RFC 3339 time: %q", line)
		}
		for _, marker := range []string{"SOURCE-MARKER", "OUTPUT-MARKER", "RESULT-MARKER"} {
			if strings.Contains(line, marker) {
				t.Errorf("the log carries the script's %s: %q", marker, line)
			}
		}
	}
	// The runtime is a copy of whichever CPython the machine has (runtime/install.sh takes 3.10 to 3.13).
	ready := s.Entries("sandbox ready")
	if len(ready) != 1 || ready[0]["cgroup_mode"] == nil || !strings.Contains(fmt.Sprint(ready[0]["versions"]), "nsjail 3.6") ||
		!supportedPython.MatchString(fmt.Sprint(ready[0]["versions"])) {
		t.Errorf("start-up entry: %v", ready)
	}
	if want := os.Getenv("SAFEPY_TEST_CGROUP_MODE"); want != "" && (len(ready) != 1 || ready[0]["cgroup_mode"] != want || ready[0]["jails"] != "forked") {
		t.Errorf("SAFEPY_TEST_CGROUP_MODE wants %s with forked jails: %v", want, ready)
	}
	if w := s.Entries(slotsWarning); len(w) != 0 {
		t.Errorf("the default slots (one per CPU) warned: %v", w)
	}
	// Cloud Run reaches the container from outside: by default the server listens on every interface.
	if e := s.Entries("serving"); len(e) != 1 || strings.HasPrefix(fmt.Sprint(e[0]["address"]), "127.") {
		t.Errorf("serving entry %v, want every interface", e)
	}
	execs := s.Entries("execution")
	if len(execs) != 2 {
		t.Fatalf("%d execution entries, want one per execution: %v", len(execs), execs)
	}
	ok, bad := execs[0], execs[1]
	if ok["severity"] != "INFO" || ok["outcome"] != "ok" || ok["logging.googleapis.com/trace"] != "projects/test-project/traces/0af7651916cd43dd8448eb211c80319c" ||
		ok["logging.googleapis.com/spanId"] != "b7ad6b7169203331" || ok["script_bytes"] != float64(len(script)) || ok["script_sha256"] == nil {
		t.Errorf("execution entry: %v", ok)
	}
	for _, k := range []string{"queue_ms", "startup_ms", "run_ms", "total_ms"} {
		if _, isNum := ok[k].(float64); !isNum {
			t.Errorf("%s missing: %v", k, ok)
		}
	}
	hr, _ := ok["httpRequest"].(map[string]any)
	if hr["requestMethod"] != "POST" || hr["status"] != 200.0 || hr["latency"] == nil || hr["responseSize"] == nil {
		t.Errorf("httpRequest: %v", hr)
	}
	if bad["outcome"] != "ExecutionError" || bad["logging.googleapis.com/trace"] != "projects/test-project/traces/105445aa7843bc8bf206b12000100000" {
		t.Errorf("second entry: %v", bad)
	}
}

// The project for trace names: GOOGLE_CLOUD_PROJECT if set; else, on Google Cloud (K_SERVICE set; Cloud Run sets
// no GOOGLE_CLOUD_PROJECT), the metadata server's answer, asked once and for at most a couple of seconds; else none.
// Each way, the start-up log says where it came from, and the server serves, also next to a metadata server that
// never answers or is not there.
func TestProjectForTraceNames(t *testing.T) {
	const traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	tests := []struct {
		name     string
		env      []string
		metadata string // "answers", "hangs" or "absent"
		from     string
		project  string
		note     string
		asked    bool
	}{
		{"from the environment", []string{"GOOGLE_CLOUD_PROJECT=env-project", "K_SERVICE=safe-py"}, "answers", "env", "env-project", "", false},
		{"from the metadata server", []string{"GOOGLE_CLOUD_PROJECT=", "K_SERVICE=safe-py"}, "answers", "metadata", "meta-project", "", true},
		{"not on Google Cloud", []string{"GOOGLE_CLOUD_PROJECT="}, "answers", "none", "", "K_SERVICE is unset", false},
		{"metadata server hangs", []string{"GOOGLE_CLOUD_PROJECT=", "K_SERVICE=safe-py"}, "hangs", "none", "", "did not answer with the project id within 2s", true},
		{"metadata server absent", []string{"GOOGLE_CLOUD_PROJECT=", "K_SERVICE=safe-py"}, "absent", "none", "", "the metadata server (127.0.0.1:", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			md := testserver.FakeMetadata(t, "meta-project", tt.metadata == "hangs")
			host := md.Host
			if tt.metadata == "absent" {
				host = "127.0.0.1:" + testserver.FreePort(t) // nothing listens there
			}
			begin := time.Now()
			s := start(t, nil, append([]string{"GCE_METADATA_HOST=" + host}, tt.env...)...)
			s.WaitHealthy(t)
			// A generous bound, far below the hanging server's patience (the whole test): start-up did not wait for it.
			if took := time.Since(begin); took > 30*time.Second {
				t.Errorf("healthy after %s", took)
			}
			if asked := md.Requests() > 0; asked != tt.asked {
				t.Errorf("metadata server asked: %v, want %v", asked, tt.asked)
			}
			status, _, err := post(s.URL, "def main():\n    return 1\n", map[string]string{"traceparent": traceparent})
			if err != nil || status != 200 {
				t.Fatalf("%d %v", status, err)
			}
			s.Cmd.Process.Signal(syscall.SIGTERM)
			s.Exit(t) // all its output read
			found := s.Entries("project for trace names")
			if len(found) != 1 || found[0]["from"] != tt.from || found[0]["project_id"] != tt.project ||
				!strings.Contains(fmt.Sprint(found[0]["note"]), tt.note) {
				t.Fatalf("start-up entry %v, want from=%s project_id=%q note~%q", found, tt.from, tt.project, tt.note)
			}
			execs := s.Entries("execution")
			want := any(nil)
			if tt.project != "" {
				want = "projects/" + tt.project + "/traces/0af7651916cd43dd8448eb211c80319c"
			}
			if len(execs) != 1 || execs[0]["logging.googleapis.com/trace"] != want {
				t.Fatalf("execution entries %v, want trace %v", execs, want)
			}
		})
	}
}

const slotsWarning = "more slots than CPUs: a limit's answer can depend on load"

// An operator who asks for more slots than CPUs is told at start-up what it costs: the contract's "1 CPU" per
// jail no longer holds under load. The server still serves.
func TestWarnsOfMoreSlotsThanCPUs(t *testing.T) {
	slots := runtime.NumCPU() + 1
	s := start(t, nil, fmt.Sprintf("SAFEPY_SLOTS=%d", slots), "SAFEPY_POOL_SIZE=1")
	s.WaitHealthy(t)
	if status, body, err := post(s.URL, "def main():\n    return 1\n", nil); err != nil || status != 200 {
		t.Fatalf("%d %s %v", status, body, err)
	}
	s.Cmd.Process.Signal(syscall.SIGTERM)
	s.Exit(t)
	w := s.Entries(slotsWarning)
	if len(w) != 1 || w[0]["severity"] != "WARNING" || w[0]["slots"] != float64(slots) || w[0]["cpus"] != float64(runtime.NumCPU()) {
		t.Fatalf("want one warning naming %d slots and %d CPUs: %v", slots, runtime.NumCPU(), w)
	}
}

// LOCAL_ONLY=true (`make run`) keeps the server to this machine: it listens on 127.0.0.1, not on the machine's
// network.
func TestLocalOnlyListensOnLoopback(t *testing.T) {
	s := start(t, nil, "LOCAL_ONLY=true", "SAFEPY_POOL_SIZE=0")
	s.WaitHealthy(t)
	s.Cmd.Process.Signal(syscall.SIGTERM)
	s.Exit(t)
	if e := s.Entries("serving"); len(e) != 1 || !strings.HasPrefix(fmt.Sprint(e[0]["address"]), "127.0.0.1:") {
		t.Fatalf("serving entry %v, want 127.0.0.1 only", e)
	}
}

// If the jail cannot be made, the server never serves: it logs why, with what to do, and exits non-zero.
func TestSelfCheckFailsClosed(t *testing.T) {
	root := testserver.Root()
	cfg, _ := os.ReadFile(filepath.Join(root, "nsjail.cfg"))
	broken := filepath.Join(t.TempDir(), "nsjail.cfg")
	os.WriteFile(broken, append(cfg, []byte("\nmount { src: \"/nonexistent-safepy\" dst: \"/x\" is_bind: true }\n")...), 0o644)

	tests := []struct {
		name string
		wrap []string
		env  []string
		want string
	}{
		{"a mount the jail needs is missing", nil, []string{"SAFEPY_NSJAIL_CONFIG=" + broken}, "Failed to mount mandatory point"},
		{"nsjail is missing", nil, []string{"SAFEPY_NSJAIL=/nonexistent/nsjail"}, "run runtime/install.sh"},
		// A user namespace in which no further user namespace may be made: what Cloud Run's gen1 looks like to nsjail.
		{"user namespaces refused", []string{"unshare", "--user", "--map-root-user", "sh", "-c", "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\""},
			nil, "--execution-environment=gen2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := start(t, tt.wrap, tt.env...)
			if code := s.Exit(t); code == 0 {
				t.Fatal("the server exited 0")
			}
			stopped := s.Entries("safe-py stopped")
			if len(stopped) != 1 || stopped[0]["severity"] != "ERROR" || !strings.Contains(fmt.Sprint(stopped[0]["error"]), tt.want) {
				t.Fatalf("want an ERROR naming %q; logs:\n%s", tt.want, strings.Join(s.Lines(), "\n"))
			}
			if len(s.Entries("serving")) != 0 {
				t.Fatal("it served")
			}
		})
	}
}

// SIGTERM lets a running execution finish and answer, then the server exits 0 and leaves no jail behind.
func TestSIGTERMDrainsInFlightRequests(t *testing.T) {
	s := start(t, nil)
	s.WaitHealthy(t)
	type answer struct {
		status int
		body   string
		err    error
	}
	got := make(chan answer, 1)
	token := fmt.Sprintf("drain-%d", time.Now().UnixNano())
	go func() {
		status, body, err := post(s.URL, marked(token, "time.sleep(1.5)\n    return 'finished'"), nil)
		got <- answer{status, body, err}
	}()
	waitFor(t, func() bool { return processesWith(token) > 0 })
	s.Cmd.Process.Signal(syscall.SIGTERM)
	a := <-got
	if a.err != nil || a.status != 200 || !strings.Contains(a.body, `"result":"finished"`) {
		t.Fatalf("in-flight request: %d %s %v", a.status, a.body, a.err)
	}
	if code := s.Exit(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
	// A killed jail's last process may take a moment to be reaped; it must go, and soon.
	waitFor(t, func() bool { return jailProcesses(s) == 0 })
	if left := cgroupsOf(s.Cmd.Process.Pid); len(left) > 0 {
		t.Fatalf("the stopped server left its cgroups: %v", left)
	}
	if nested := nestedServerLeaves(); len(nested) > 0 {
		t.Fatalf("a server started from an earlier server's leaf made another leaf inside it: %v", nested)
	}
}

// An execution that outlives the grace period is killed, and the server still exits 0 with nothing left behind.
func TestSIGTERMKillsWhatOutlivesTheGrace(t *testing.T) {
	s := start(t, nil, "SAFEPY_SHUTDOWN_GRACE=300ms")
	s.WaitHealthy(t)
	got := make(chan error, 1)
	token := fmt.Sprintf("outlive-%d", time.Now().UnixNano())
	go func() {
		_, _, err := post(s.URL, marked(token, "time.sleep(60)"), nil)
		got <- err
	}()
	waitFor(t, func() bool { return processesWith(token) > 0 })
	s.Cmd.Process.Signal(syscall.SIGTERM)
	if code := s.Exit(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
	<-got
	// A killed jail's last process may take a moment to be reaped; it must go, and soon.
	waitFor(t, func() bool { return jailProcesses(s) == 0 })
	if left := cgroupsOf(s.Cmd.Process.Pid); len(left) > 0 {
		t.Fatalf("the stopped server left its cgroups: %v", left)
	}
	if nested := nestedServerLeaves(); len(nested) > 0 {
		t.Fatalf("a server started from an earlier server's leaf made another leaf inside it: %v", nested)
	}
	if len(s.Entries("grace period over: killing the jails still running")) != 1 {
		t.Fatalf("logs:\n%s", strings.Join(s.Lines(), "\n"))
	}
}

// cgroupsOf lists the cgroups a server with that pid made (its runner's directories are named "PID-N"), on every
// hierarchy this process can see.
func cgroupsOf(pid int) []string {
	var found []string
	prefix := fmt.Sprintf("%d-", pid)
	filepath.WalkDir("/sys/fs/cgroup", func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if strings.HasPrefix(d.Name(), prefix) {
			found = append(found, path)
			return filepath.SkipDir
		}
		return nil
	})
	return found
}

// nestedServerLeaves lists the cgroups named like the leaf a v2 server moves its cgroup's processes into, inside
// another such leaf. This test's servers all start from this process, which the first server in a container's or
// a service's cgroup moves into that leaf; the next must use the cgroup above it again.
func nestedServerLeaves() []string {
	var found []string
	filepath.WalkDir("/sys/fs/cgroup", func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() && d.Name() == "safepy-server" && filepath.Base(filepath.Dir(path)) == "safepy-server" {
			found = append(found, path)
		}
		return nil
	})
	return found
}

// marked is a script that first starts a process carrying token in its command line, so the test can see from
// outside that the script is running, then runs body.
func marked(token, body string) string {
	return fmt.Sprintf("import subprocess, time\ndef main():\n    subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(60)', %q])\n    %s\n", token, body)
}

// processesWith counts the processes started by this test's servers whose command line contains s.
func processesWith(s string) int { return len(proctree.Live(os.Getpid(), s)) }

// jailProcesses counts what is left of the servers this test started: every live process in this test's tree
// (the servers' own, and whatever they left behind, which this process adopts), less the servers themselves.
func jailProcesses(servers ...*testserver.Server) int {
	n := 0
	for _, p := range proctree.Live(os.Getpid(), "") {
		own := false
		for _, s := range servers {
			own = own || p.PID == s.Cmd.Process.Pid
		}
		if !own {
			n++
		}
	}
	return n
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("gave up waiting")
		}
	}
}

// Idle keep-alive clients and clients that send half a header and stop must not starve new ones: with 200 of the
// first and 100 of the second held open, a new client's health check and a trivial execution each answer promptly.
func TestIdleAndSlowClientsDoNotStarveNewOnes(t *testing.T) {
	s := start(t, nil, "SAFEPY_MAX_CONNS=256") // below what is held, so that making room is exercised too
	s.WaitHealthy(t)
	addr := strings.TrimPrefix(s.URL, "http://")
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := 0; i < 200; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		fmt.Fprint(c, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("idle client %d: %v", i, err)
		}
		io.ReadAll(resp.Body)
	}
	for i := 0; i < 100; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		fmt.Fprint(c, "POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
	}
	// The bound is the issue's: a new client must not wait behind them. It is far above what either takes on an
	// idle machine (milliseconds for the health check, tens for the execution).
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(s.URL + "/health")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("health check next to 300 idle and slow connections: %v", err)
	}
	resp.Body.Close()
	body, _ := json.Marshal(map[string]string{"script": "def main():\n    return 1\n"})
	resp, err = client.Post(s.URL+"/execute", "application/json", strings.NewReader(string(body)))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("execution next to 300 idle and slow connections: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != `{"result":1,"stdout":""}`+"\n" {
		t.Fatalf("answer %s", b)
	}
}
