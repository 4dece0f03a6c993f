package safepy

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/safe-py/safepy/internal/budget"
	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/internal/testjail"
	"github.com/safe-py/safepy/internal/workload"
	"github.com/safe-py/safepy/sandbox"
)

// These tests serve the registered function itself (Execute) over real HTTP, with the real sandbox behind it.
var srv *httptest.Server

func TestMain(m *testing.M) {
	if os.Getenv(frameworkChild) == "1" {
		serveWithFuncframework() // this process is a server that a test started; see funcframework_test.go
	}
	flag.Parse()
	f, w := flag.Lookup("test.fuzz"), flag.Lookup("test.fuzzworker")
	if f != nil && f.Value.String() != "" || w != nil && w.Value.String() == "true" {
		os.Exit(m.Run()) // FuzzDecodeRequest needs no sandbox; every fuzz worker would start one for nothing
	}
	// The jail definition for this machine (testjail); set in the environment, the way every server the tests
	// start reads it, before the configuration is read.
	tmp, err := os.MkdirTemp("", "safepy-test-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(tmp)
	runtimeDir := cmp.Or(os.Getenv("SAFEPY_RUNTIME_DIR"), ".runtime")
	cfgPath, note, err := testjail.Config(cmp.Or(os.Getenv("SAFEPY_NSJAIL_CONFIG"), "nsjail.cfg"), runtimeDir, tmp)
	if err != nil {
		fmt.Fprintf(os.Stderr, "the service could not start (run `make test`): %v\n", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "safepy tests: %s\n", note)
	os.Setenv("SAFEPY_NSJAIL_CONFIG", cfgPath)
	svc, err := Prepare()
	if err != nil {
		fmt.Fprintf(os.Stderr, "the service could not start (run `make test`): %v\n", err)
		os.Exit(1)
	}
	info := svc.runner.Info()
	fmt.Fprintf(os.Stderr, "safepy tests: enforcement %s; jails %s %s\n", info.CgroupMode, info.Path, info.PathNote)
	if want := os.Getenv("SAFEPY_TEST_CGROUP_MODE"); want != "" && (string(info.CgroupMode) != want || info.Path != "forked") {
		fmt.Fprintf(os.Stderr, "safepy tests: SAFEPY_TEST_CGROUP_MODE wants %s with forked jails\n", want)
		os.Exit(1)
	}
	srv = httptest.NewServer(http.HandlerFunc(Execute))
	code := m.Run()
	srv.Close()
	svc.Close()
	os.RemoveAll(tmp)
	os.Exit(code)
}

// errorShape is the contract's error answer.
type errorShape struct {
	Error  apiError `json:"error"`
	Stdout *string  `json:"stdout"`
}

// errorBody decodes an error answer; a body of any other shape fails the test.
func errorBody(t *testing.T, body []byte) errorShape {
	t.Helper()
	var e errorShape
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("body is not the error shape: %s", body)
	}
	return e
}

// wantValidationError checks that r is a ValidationError with status and a message containing message, and that
// no stdout came with it (no script ran).
func wantValidationError(t *testing.T, r response, status int, message string) {
	t.Helper()
	e := errorBody(t, r.body)
	if r.status != status || e.Error.Type != "ValidationError" || !strings.Contains(e.Error.Message, message) {
		t.Fatalf("got %d %s, want %d ValidationError %q", r.status, r.body, status, message)
	}
	if e.Stdout != nil {
		t.Fatalf("stdout present although no script ran: %s", r.body)
	}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func post(t *testing.T, body string) response {
	t.Helper()
	return do(t, http.MethodPost, "/execute", body)
}

func do(t *testing.T, method, path, body string) response {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s %s: Content-Type %q", method, path, ct)
	}
	return response{resp.StatusCode, resp.Header, b}
}

func scriptBody(script string) string {
	b, _ := json.Marshal(map[string]string{"script": script})
	return string(b)
}

// jsonEqual compares two JSON texts as values, but numbers as their literal text.
func jsonEqual(t *testing.T, got []byte, want string) {
	t.Helper()
	norm := func(s []byte) string {
		dec := json.NewDecoder(bytes.NewReader(s))
		dec.UseNumber()
		var v any
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("not JSON: %s", s)
		}
		out, _ := json.Marshal(v)
		return string(out)
	}
	if norm(got) != norm([]byte(want)) {
		t.Fatalf("body\n  %s\nwant\n  %s", got, want)
	}
}

// contractExamples are the contract's examples, exactly as the README shows them: every way of serving runs them.
var contractExamples = []struct {
	name, body string
	status     int
	want       string
}{
	{"hello", `{"script":"def main():\n    print('hello')\n    return {'ok': True}\n"}`,
		200, `{"result": {"ok": true}, "stdout": "hello\n"}`},
	{"numpy", `{"script":"def main():\n    import numpy as np\n    print(np.arange(3))\n    return {\"sum\": int(np.sum([1,2,3])) }\n"}`,
		200, `{"result": {"sum": 6}, "stdout": "[0 1 2]\n"}`},
	{"pandas", `{"script":"def main():\n    import os, pandas as pd\n    print(list(sorted(os.listdir(\"/\")))[:5])\n    return { \"rows\": int(pd.DataFrame({\"a\":[1,2,3]}).shape[0]) }\n"}`,
		200, `{"result": {"rows": 3}, "stdout": "['bin', 'dev', 'lib', 'lib64', 'proc']\n"}`},
	{"empty object", `{}`,
		400, `{"error": {"type": "ValidationError", "message": "missing 'script' field"}}`},
}

func TestContractExamples(t *testing.T) {
	for _, tt := range contractExamples {
		t.Run(tt.name, func(t *testing.T) {
			r := post(t, tt.body)
			if r.status != tt.status {
				t.Fatalf("status %d, want %d: %s", r.status, tt.status, r.body)
			}
			jsonEqual(t, r.body, tt.want)
		})
	}
}

// Numbers arrive as Python wrote them: the server never decodes them into float64.
func TestResultFidelityOverHTTP(t *testing.T) {
	r := post(t, scriptBody("def main():\n    return [2**70 + 1, 0.1, 1e308, -0.0]\n"))
	if want := `{"result":[1180591620717411303425,0.1,1e+308,-0.0],"stdout":""}` + "\n"; string(r.body) != want {
		t.Fatalf("body %s, want %s", r.body, want)
	}
}

func TestValidation(t *testing.T) {
	big := strings.Repeat("#", 1<<20) // a script of exactly the cap is fine; one byte more is not
	tests := []struct {
		name, body string
		status     int
		message    string
	}{
		{"not JSON", `def main(): pass`, 400, "request body must be a JSON object"},
		{"broken JSON", `{"script": "x"`, 400, "request body is not valid JSON"},
		{"array", `["def main(): pass"]`, 400, "request body must be a JSON object"},
		{"null", `null`, 400, "request body must be a JSON object"},
		{"empty body", ``, 400, "request body must be a JSON object"},
		{"missing script", `{"code": "x"}`, 400, "unknown field \"code\""},
		{"missing script field", `{}`, 400, "missing 'script' field"},
		{"script not a string", `{"script": 42}`, 400, "'script' must be a string"},
		{"script null", `{"script": null}`, 400, "'script' must be a string"},
		{"script empty", `{"script": ""}`, 400, "'script' must not be empty"},
		{"two objects", `{"script": "x"} {"script": "y"}`, 400, "a single JSON object"},
		{"script over its cap", scriptBody(big + "#"), 413, "'script' is over the limit of 1048576 bytes"},
		{"body over its cap", `{"script": "` + strings.Repeat("x", 2<<20) + `"}`, 413, "request body is over the limit of 2097152 bytes"},
		// The script that runs is exactly the one sent: nothing is picked, replaced or repaired.
		{"brackets only", `{"script":"x","a":` + strings.Repeat("[", 100000) + `}`, 400, `nested deeper than 32 levels`},
		{"two script keys", `{"script": "def main(): return 1", "script": "def main(): return 2"}`, 400, `duplicate key "script"`},
		{"a duplicate key deeper down", `{"script": "x", "a": {"b": 1, "b": 2}}`, 400, `duplicate key "b"`},
		{"invalid UTF-8 in the script", "{\"script\": \"def main(): return '\xff'\"}", 400, "not valid UTF-8 (at byte 32)"},
		{"invalid UTF-8 outside it", "{\"script\": \"x\"}\xc3", 400, "not valid UTF-8"},
		{"a lone surrogate escape", `{"script": "def main(): return '\ud800'"}`, 400, "unpaired surrogate"},
		{"a reversed surrogate pair", `{"script": "x\ude00\ud83d"}`, 400, "unpaired surrogate"},
		{"a form feed after the object", "{\"script\": \"x\"}\f", 400, "not valid JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantValidationError(t, post(t, tt.body), tt.status, tt.message)
		})
	}
	// A body over the cap without a Content-Length is cut off while it streams in.
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/execute", io.MultiReader(strings.NewReader(`{"script":"`),
		strings.NewReader(strings.Repeat("x", 3<<20))))
	req.ContentLength = -1
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 413 {
		t.Fatalf("chunked oversized body: status %d", resp.StatusCode)
	}
	// An escaped backslash before a u is not an escape, and a real surrogate pair is a character.
	if r := post(t, `{"script":"def main():\n    return [r'\\ud800', '\ud83d\ude00']\n"}`); r.status != 200 ||
		string(r.body) != `{"result":["\\ud800","😀"],"stdout":""}`+"\n" {
		t.Fatalf("escapes: %d %s", r.status, r.body)
	}
	// A script of exactly the cap is accepted.
	tail := "\ndef main(): return 1\n"
	if r := post(t, scriptBody(big[:1<<20-len(tail)]+tail)); r.status != 200 {
		t.Fatalf("a script at the cap: %d %s", r.status, r.body)
	}
}

// A client that writes its whole body before it reads its answer (Python's urllib, curl without Expect) still gets
// the 413, also for a body much larger than what the kernel's socket buffers hold; with or without a length.
func TestOversizedBodyGetsItsAnswer(t *testing.T) {
	body := append([]byte(`{"script":"`), bytes.Repeat([]byte("x"), 12<<20)...)
	addr := strings.TrimPrefix(srv.URL, "http://")
	for i := 0; i < 6; i++ {
		chunked := i%2 == 1
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		head := "POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
		if chunked {
			head += "Transfer-Encoding: chunked\r\n\r\n" + fmt.Sprintf("%x\r\n", len(body))
		} else {
			head += fmt.Sprintf("Content-Length: %d\r\n\r\n", len(body))
		}
		_, err = conn.Write(append([]byte(head), body...))
		if err == nil && chunked {
			_, err = conn.Write([]byte("\r\n0\r\n\r\n"))
		}
		if err != nil {
			t.Fatalf("round %d (chunked %v): writing the body: %v", i, chunked, err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("round %d (chunked %v): reading the answer: %v", i, chunked, err)
		}
		b, _ := io.ReadAll(resp.Body)
		conn.Close()
		if resp.StatusCode != 413 || !bytes.Contains(b, []byte(`"type":"ValidationError"`)) {
			t.Fatalf("round %d: %d %s", i, resp.StatusCode, b)
		}
	}
}

// What a client controls (URL, User-Agent, Referer) reaches the access log cut to a sane length.
func TestAccessLogIsBounded(t *testing.T) {
	r := httptest.NewRequest("POST", "/execute?"+strings.Repeat("q", 70000), nil)
	r.Header.Set("User-Agent", strings.Repeat("u", 60000))
	r.Header.Set("Referer", strings.Repeat("r", 60000))
	r.Header.Set("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	l := loggable(r)
	if n := len(l.URL.String()) + len(l.UserAgent()) + len(l.Referer()); n > 3*(maxLoggedLen+3) {
		t.Fatalf("%d bytes of client-controlled text in the log entry", n)
	}
	if l.Header.Get("Traceparent") == "" || l.Method != "POST" {
		t.Fatalf("the trace or method was lost: %+v", l)
	}
}

func TestRouting(t *testing.T) {
	tests := []struct {
		method, path string
		status       int
		allow        string
	}{
		{"GET", "/execute", 405, "POST"},
		{"PUT", "/execute", 405, "POST"},
		{"POST", "/healthz", 405, "GET, HEAD"},
		{"POST", "/health", 405, "GET, HEAD"},
		{"GET", "/health", 200, ""},
		{"GET", "/", 404, ""},
		{"POST", "/execute/", 404, ""},
		{"GET", "/healthz", 200, ""},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			r := do(t, tt.method, tt.path, "")
			if r.status != tt.status || r.header.Get("Allow") != tt.allow {
				t.Fatalf("got %d Allow=%q, want %d Allow=%q: %s", r.status, r.header.Get("Allow"), tt.status, tt.allow, r.body)
			}
			if tt.status != 200 {
				var e struct{ Error apiError }
				if json.Unmarshal(r.body, &e) != nil || e.Error.Type == "" || e.Error.Message == "" {
					t.Fatalf("error body %s", r.body)
				}
			}
		})
	}
}

// Every 422 row of the contract's table, over HTTP, with the stdout printed before the failure.
func TestScriptErrorsOverHTTP(t *testing.T) {
	tests := []struct {
		name, script, typ, message string
	}{
		{"syntax", "print('before')\ndef main(:\n", "ExecutionError", "SyntaxError"},
		{"exception", "def main():\n    print('before')\n    raise ValueError('bad value')\n", "ExecutionError", "ValueError: bad value"},
		{"missing main", "print('before')\n", "ExecutionError", "main() is missing or not callable"},
		{"exit", "import sys\ndef main():\n    print('before')\n    sys.exit(0)\n", "ExecutionError", "before main() returned"},
		{"serialization", "def main():\n    print('before')\n    return {1}\n", "SerializationError", "main() must return JSON-serializable data"},
		{"timeout", "import time\ndef main():\n    print('before')\n    time.sleep(60)\n", "TimeoutError", "wall-clock limit"},
		{"memory", "def main():\n    print('before')\n    b = [bytearray(1 << 20) for _ in range(400)]\n", "ResourceLimitError", "memory limit of 256 MiB"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := post(t, scriptBody(tt.script))
			e := errorBody(t, r.body)
			if r.status != 422 || e.Error.Type != tt.typ || !strings.Contains(e.Error.Message, tt.message) {
				t.Fatalf("got %d %s, want 422 %s %q", r.status, r.body, tt.typ, tt.message)
			}
			wantStdout := "before\n"
			if tt.name == "syntax" {
				wantStdout = "" // the script never started running
			}
			if e.Stdout == nil || *e.Stdout != wantStdout {
				t.Fatalf("stdout %v, want %q", e.Stdout, wantStdout)
			}
		})
	}
	r := post(t, scriptBody("def main():\n    raise KeyError('k')\n"))
	if !bytes.Contains(r.body, []byte(`"traceback":"Traceback (most recent call last):\n  File \"/sandbox/script.py\", line 2, in main`)) {
		t.Fatalf("no traceback: %s", r.body)
	}
}

func TestStdoutTruncatedOverHTTP(t *testing.T) {
	r := post(t, scriptBody("def main():\n    print('y' * (2 << 20))\n    return 0\n"))
	var ok struct {
		Stdout          string `json:"stdout"`
		StdoutTruncated bool   `json:"stdout_truncated"`
	}
	json.Unmarshal(r.body, &ok)
	if r.status != 200 || !ok.StdoutTruncated || len(ok.Stdout) != 1<<20 {
		t.Fatalf("status %d truncated %v len %d", r.status, ok.StdoutTruncated, len(ok.Stdout))
	}
}

func TestConcurrentRequestsStayApart(t *testing.T) {
	ts := newTestService(t, 4, time.Minute)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, _, body, err := postTo(context.Background(), ts.URL, scriptBody(fmt.Sprintf("import os\ndef main():\n    open('/sandbox/f', 'a').write('%d')\n    print(%d)\n    return open('/sandbox/f').read()\n", i, i)))
			// The file it wrote comes back too: its own, with its own digit.
			want := fmt.Sprintf(`{"result":"%d","stdout":"%d\n","files":[{"path":"f","size":1,"content":"%s"}]}`+"\n",
				i, i, base64.StdEncoding.EncodeToString([]byte(fmt.Sprint(i))))
			if err != nil || string(body) != want {
				errs <- fmt.Errorf("request %d: %s %v", i, body, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Fail closed: a sandbox that cannot run scripts gives no service, and a sandbox that breaks later answers 500
// InternalError, never a result from anywhere else.
func TestFailsClosed(t *testing.T) {
	cfg, err := ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	t.Run("nsjail missing", func(t *testing.T) {
		c := cfg
		c.Sandbox.Nsjail = filepath.Join(t.TempDir(), "nsjail")
		if _, err := NewService(c, slog.Default()); !errors.Is(err, sandbox.ErrSandbox) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("jail cannot be created", func(t *testing.T) {
		// A config with a mandatory mount that cannot be made: nsjail refuses, and so the self-check fails.
		data, _ := os.ReadFile(cfg.Sandbox.JailConfig)
		broken := filepath.Join(t.TempDir(), "nsjail.cfg")
		data = append(data, []byte("\nmount { src: \"/nonexistent-safepy\" dst: \"/x\" is_bind: true }\n")...)
		os.WriteFile(broken, data, 0o644)
		c := cfg
		c.Sandbox.JailConfig = broken
		_, err := NewService(c, slog.Default())
		if !errors.Is(err, sandbox.ErrSandbox) || !strings.Contains(err.Error(), "self-check") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("sandbox breaks after start", func(t *testing.T) {
		c := cfg
		svc, err := NewService(c, slog.Default())
		if err != nil {
			t.Fatal(err)
		}
		defer svc.Close()
		svc.runner.Close()
		svc.runner = brokenRunner(t, c)
		w := httptest.NewRecorder()
		svc.ServeHTTP(w, httptest.NewRequest("POST", "/execute", strings.NewReader(scriptBody("def main():\n    return 1\n"))))
		if w.Code != 500 || !strings.Contains(w.Body.String(), `"type":"InternalError"`) {
			t.Fatalf("got %d %s", w.Code, w.Body)
		}
	})
	t.Run("unavailable answers", func(t *testing.T) {
		// The kind of failure, and when a retry may help; never the error's own text, which names the host's paths.
		internal := errors.New("open /opt/secret/nsjail: no user namespaces")
		tests := []struct {
			path   string
			err    error
			status int
			want   string
			retry  bool
		}{
			{"/execute", &notReady{err: internal, retryAt: time.Now().Add(5 * time.Second)}, 500, "the sandbox is unavailable", true},
			{"/healthz", &notReady{err: internal, retryAt: time.Now().Add(5 * time.Second)}, 503, "the sandbox is unavailable", true},
			{"/health", &notReady{err: internal, invalidConfig: true}, 503, "configuration is invalid", false},
			{"/execute", internal, 500, "the sandbox is unavailable", false},
		}
		for _, tt := range tests {
			w := httptest.NewRecorder()
			unavailable(w, httptest.NewRequest("POST", tt.path, nil), tt.err)
			body := w.Body.String()
			if w.Code != tt.status || !strings.Contains(body, `"type":"InternalError"`) || !strings.Contains(body, tt.want) ||
				strings.Contains(body, "secret") || strings.Contains(body, "namespaces") || (w.Header().Get("Retry-After") != "") != tt.retry {
				t.Errorf("%s: %d Retry-After=%q %s", tt.path, w.Code, w.Header().Get("Retry-After"), body)
			}
		}
	})
}

// brokenRunner is a real runner whose nsjail binary is deleted after it was checked.
func brokenRunner(t *testing.T, c Config) *sandbox.Runner {
	def, err := jaildef.Read(c.Sandbox.Nsjail, c.Sandbox.JailConfig) // the real nsjail's schema, as the service reads it
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	fake := filepath.Join(dir, "nsjail")
	os.WriteFile(fake, []byte("#!/bin/sh\nexit 1\n"), 0o755)
	c.Sandbox.Nsjail, c.Sandbox.Definition = fake, def
	r, err := sandbox.New(context.Background(), c.Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	os.Remove(fake)
	return r
}

func filesBody(script string, files ...any) string {
	b, _ := json.Marshal(map[string]any{"script": script, "files": files})
	return string(b)
}

func fileEntry(path string, data []byte) map[string]string {
	return map[string]string{"path": path, "content": base64.StdEncoding.EncodeToString(data)}
}

// Every bad files entry is a 400 ValidationError that names the entry, and nothing runs.
func TestFilesValidation(t *testing.T) {
	script := "def main():\n    open('/tmp/ran', 'w')\n    return 1\n"
	ok := fileEntry("a.csv", []byte("x"))
	many := make([]any, 65)
	for i := range many {
		many[i] = fileEntry(fmt.Sprintf("f%d", i), nil)
	}
	// 64 files, each 500 directories deep: every path passes, together they need 32,000 inodes.
	deep := make([]any, 64)
	for i := range deep {
		deep[i] = fileEntry(fmt.Sprintf("x%02d/", i)+strings.Repeat("d/", 500)+"f", nil)
	}
	tests := []struct {
		name, body, message string
	}{
		{"absolute path", filesBody(script, ok, fileEntry("/etc/passwd", nil)), `files[1] ("/etc/passwd"): the path must be relative`},
		{"a .. component", filesBody(script, fileEntry("data/../../x", nil)), `files[0] ("data/../../x"): the path has a ".." component`},
		{"empty path", filesBody(script, fileEntry("", nil)), `files[0] (""): the path is empty`},
		{"duplicate", filesBody(script, ok, fileEntry("b", nil), ok), `files[2] ("a.csv"): the path is the same as that of entry 0`},
		{"file and directory", filesBody(script, ok, fileEntry("a.csv/x", nil)), `files[1] ("a.csv/x"): the path is below entry 0's`},
		{"bad base64", filesBody(script, map[string]string{"path": "a", "content": "not base64!"}), `files[0] ("a"): 'content' is not valid base64`},
		{"missing content", filesBody(script, map[string]string{"path": "a"}), `files[0] ("a") has no 'content'`},
		{"missing path", filesBody(script, map[string]string{"content": ""}), `files[0] has no 'path'`},
		{"content not a string", filesBody(script, map[string]any{"path": "a", "content": 5}), `files[0] ("a"): 'content' must be a string`},
		{"unknown field", filesBody(script, map[string]string{"path": "a", "content": "", "mode": "0777"}), `files[0] ("a") has an unknown field "mode"`},
		{"not an object", filesBody(script, "a.csv"), `files[0] must be an object`},
		{"not an array", `{"script":"def main(): pass","files":{"a":"b"}}`, `'files' must be an array`},
		{"more than 64", filesBody(script, many...), `'files' has more than 64 entries`},
		{"more inodes than /sandbox has", filesBody(script, deep...), `need more than the 4096 inodes /sandbox has`},
		{"base64 with a line break", filesBody(script, map[string]string{"path": "a", "content": "aGk=\n"}), `'content' is not valid base64`},
		{"base64 with stray bits", filesBody(script, map[string]string{"path": "a", "content": "YR=="}), `'content' is not valid base64`},
		{"nested too deeply", `{"script":"x","files":` + strings.Repeat("[", 40) + strings.Repeat("]", 40) + `}`, `nested deeper than 32 levels`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantValidationError(t, post(t, tt.body), 400, tt.message)
		})
	}
}

// Over HTTP: binary input files arrive byte for byte, output files come back in base64 with their sizes, sorted,
// with stderr when the script wrote some; a plot comes back as a PNG.
func TestFilesOverHTTP(t *testing.T) {
	var all []byte
	for i := 0; i < 256; i++ {
		all = append(all, byte(i))
	}
	r := post(t, filesBody(`import sys
def main():
    data = open("in/all.bin", "rb").read()
    open("out.bin", "wb").write(data[::-1])
    print("warning", file=sys.stderr)
    return len(data)
`, fileEntry("in/all.bin", all)))
	var ok struct {
		Result json.RawMessage `json:"result"`
		Stdout string          `json:"stdout"`
		Stderr string          `json:"stderr"`
		Files  []struct {
			Path    string `json:"path"`
			Size    int    `json:"size"`
			Content string `json:"content"`
		} `json:"files"`
	}
	if err := json.Unmarshal(r.body, &ok); err != nil || r.status != 200 {
		t.Fatalf("%d %s", r.status, r.body)
	}
	if string(ok.Result) != "256" || ok.Stderr != "warning\n" || len(ok.Files) != 1 || ok.Files[0].Path != "out.bin" || ok.Files[0].Size != 256 {
		t.Fatalf("answer %s", r.body)
	}
	if b, _ := base64.StdEncoding.DecodeString(ok.Files[0].Content); len(b) != 256 || b[0] != 255 || b[255] != 0 {
		t.Fatalf("out.bin %v", b)
	}
	if !bytes.HasSuffix(r.body, []byte(`"stderr":"warning\n","files":[{"path":"out.bin","size":256,"content":"`+ok.Files[0].Content+`"}]}`+"\n")) {
		t.Fatalf("field order: %s", r.body)
	}

	r = post(t, filesBody(workload.Plot.Source, fileEntry("data.csv", []byte(workload.PlotCSV))))
	json.Unmarshal(r.body, &ok)
	if r.status != 200 || len(ok.Files) != 1 || ok.Files[0].Path != "plot.png" {
		t.Fatalf("plot: %d %s", r.status, r.body[:min(len(r.body), 300)])
	}
	if png, _ := base64.StdEncoding.DecodeString(ok.Files[0].Content); !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		t.Fatal("plot.png is not a PNG")
	}

	// A file that does not fit is left out and named, never an error; so on an error answer.
	for _, tt := range []struct{ script, want string }{
		{"def main():\n    open('scratch.csv', 'wb').write(b'x' * (9 << 20))\n    open('a.txt', 'w').write('a')\n    return 1\n",
			`{"result":1,"stdout":"","files":[{"path":"a.txt","size":1,"content":"YQ=="}],"files_truncated":true,"files_omitted":[{"path":"scratch.csv","size":9437184}]}`},
		{"def main():\n    open('scratch.csv', 'wb').write(b'x' * (9 << 20))\n    raise ValueError('half way')\n",
			`{"error":{"type":"ExecutionError","message":"ValueError: half way","traceback":"Traceback (most recent call last):\n  File \"/sandbox/script.py\", line 3, in main\n    raise ValueError('half way')\nValueError: half way\n"},"stdout":"","files_truncated":true,"files_omitted":[{"path":"scratch.csv","size":9437184}]}`},
	} {
		r = post(t, scriptBody(tt.script))
		if string(r.body) != tt.want+"\n" {
			t.Fatalf("got  %s\nwant %s", r.body, tt.want)
		}
	}
}

// A request without files, whose script writes nothing to stderr and leaves no file, gets exactly the answer it got
// before files and stderr existed: the contract's examples, byte for byte, and an error's shape.
func TestAnswersUnchangedByteForByte(t *testing.T) {
	for _, tt := range []struct{ body, want string }{
		{`{"script":"def main():\n    print('hello')\n    return {'ok': True}\n"}`, `{"result":{"ok":true},"stdout":"hello\n"}` + "\n"},
		{`{"script":"def main():\n    import numpy as np\n    print(np.arange(3))\n    return {\"sum\": int(np.sum([1,2,3])) }\n"}`, `{"result":{"sum":6},"stdout":"[0 1 2]\n"}` + "\n"},
		{`{"script":"def main():\n    import os, pandas as pd\n    print(list(sorted(os.listdir(\"/\")))[:5])\n    return { \"rows\": int(pd.DataFrame({\"a\":[1,2,3]}).shape[0]) }\n"}`, `{"result":{"rows":3},"stdout":"['bin', 'dev', 'lib', 'lib64', 'proc']\n"}` + "\n"},
		{`{}`, `{"error":{"type":"ValidationError","message":"missing 'script' field"}}` + "\n"},
		{`{"script":"def main():\n    print('x')\n    raise ValueError('v')\n"}`, ""},
	} {
		r := post(t, tt.body)
		if tt.want == "" {
			if bytes.Contains(r.body, []byte(`"stderr"`)) || bytes.Contains(r.body, []byte(`"files"`)) {
				t.Errorf("an error without stderr or files carries them: %s", r.body)
			}
			continue
		}
		if string(r.body) != tt.want {
			t.Errorf("body\n  %q\nwant\n  %q", r.body, tt.want)
		}
	}
}

// Decoding a body costs memory of the order of its size, whatever its shape: a body of 2 MiB of brackets, or of a
// million empty files entries, is refused without the decoder's stacks or a million entries.
// keyBomb is `,"0":0,"1":0,...` of about n bytes: an object of distinct keys.
func keyBomb(n int) string {
	var b strings.Builder
	for i := 0; b.Len() < n-16; i++ {
		fmt.Fprintf(&b, `,"%d":0`, i)
	}
	return b.String()
}

func TestDecodingCostIsBounded(t *testing.T) {
	for name, body := range map[string]string{
		"brackets":             `{"script":"x","files":` + strings.Repeat("[", 2<<20-40) + `}`,
		"objects":              `{"script":"x","a":` + strings.Repeat(`{"a":`, (2<<20-40)/5) + `}`,
		"files entries":        `{"script":"x","files":[` + strings.Repeat(`{},`, (2<<20-40)/3) + `{}]}`,
		"distinct keys":        `{"script":"x"` + keyBomb(2<<20-40) + `}`,
		"distinct keys deeper": `{"script":"x","files":[{"path":"a","content":""` + keyBomb(2<<20-80) + `}]}`,
	} {
		t.Run(name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			r := httptest.NewRequest(http.MethodPost, "/execute", strings.NewReader(body))
			_, status, verr := decodeRequest(httptest.NewRecorder(), r, budget.New(64<<20, 0, 0).NewHold(), 2<<20, 1<<20, 4096)
			runtime.ReadMemStats(&after)
			if verr == nil || status != 400 {
				t.Fatalf("accepted: %d %v", status, verr)
			}
			if allocated := after.TotalAlloc - before.TotalAlloc; allocated > 4*uint64(len(body)) {
				t.Fatalf("decoding a %d-byte body allocated %d MiB", len(body), allocated>>20)
			}
		})
	}
}
