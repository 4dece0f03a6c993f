package safepy

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/funcframework"

	"github.com/safe-py/safepy/internal/testserver"
)

// These tests serve the registered function the way the Functions Framework's users run one: the framework's own
// server (funcframework.StartHostPort) with FUNCTION_TARGET=Execute, in a process of its own whose environment the
// test sets and in which nothing prepared the service beforehand. That process is this test binary, started again
// with frameworkChild set: TestMain then serves instead of testing.

const frameworkChild = "SAFEPY_TEST_FUNCFRAMEWORK_CHILD"

// serveWithFuncframework is all such a process does. It listens on 127.0.0.1 only.
func serveWithFuncframework() {
	err := funcframework.StartHostPort("127.0.0.1", os.Getenv("PORT"))
	fmt.Fprintln(os.Stderr, "funcframework:", err)
	os.Exit(1)
}

// startFramework starts such a process with env added to a clean environment that points at the repository's
// runtime and jail.
func startFramework(t *testing.T, env ...string) *testserver.Server {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// A server killed without a shutdown leaves its harness's directory behind: keep it in one this test removes.
	tmp, err := os.MkdirTemp("", "safepy-funcframework-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(tmp, 0o755)
	t.Cleanup(func() { os.RemoveAll(tmp) }) // after the process is gone: cleanups run last-registered first
	return testserver.Start(t, []string{exe}, append([]string{frameworkChild + "=1", "FUNCTION_TARGET=" + FunctionName,
		"TMPDIR=" + tmp}, env...)...)
}

type reply struct {
	status int
	header http.Header
	body   []byte
}

func request(t *testing.T, base, method, path, body string, header map[string]string) reply {
	t.Helper()
	req, err := http.NewRequest(method, base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, resp.Header, b}
}

// The contract under the framework's own server: its four examples, every status row of its error table (503
// Overloaded aside: the overload tests cover it), the health check, and logs in Cloud Logging's JSON with trace
// names for a project the metadata server gave (Cloud Run sets K_SERVICE and no GOOGLE_CLOUD_PROJECT).
func TestFunctionsFrameworkServesTheContract(t *testing.T) {
	md := testserver.FakeMetadata(t, "meta-project", false)
	s := startFramework(t, "K_SERVICE=safe-py", "GCE_METADATA_HOST="+md.Host)
	s.WaitHealthy(t)

	for _, tt := range contractExamples {
		t.Run("example "+tt.name, func(t *testing.T) {
			a := request(t, s.URL, "POST", "/execute", tt.body, nil)
			if a.status != tt.status {
				t.Fatalf("status %d, want %d: %s", a.status, tt.status, a.body)
			}
			jsonEqual(t, a.body, tt.want)
		})
	}

	rows := []struct {
		name, method, path, body string
		status                   int
		typ, message, allow      string
		stdout                   bool // the script started, so stdout is in the answer
	}{
		{"not JSON", "POST", "/execute", `def main(): pass`, 400, "ValidationError", "must be a JSON object", "", false},
		{"not an object", "POST", "/execute", `["x"]`, 400, "ValidationError", "must be a JSON object", "", false},
		{"invalid UTF-8", "POST", "/execute", "{\"script\": \"x\xff\"}", 400, "ValidationError", "not valid UTF-8", "", false},
		{"duplicate key", "POST", "/execute", `{"script": "a", "script": "b"}`, 400, "ValidationError", `duplicate key "script"`, "", false},
		{"unpaired surrogate", "POST", "/execute", `{"script": "\ud800"}`, 400, "ValidationError", "unpaired surrogate", "", false},
		{"unknown field", "POST", "/execute", `{"script": "x", "code": "y"}`, 400, "ValidationError", `unknown field "code"`, "", false},
		{"script not a string", "POST", "/execute", `{"script": 1}`, 400, "ValidationError", "'script' must be a string", "", false},
		{"script empty", "POST", "/execute", `{"script": ""}`, 400, "ValidationError", "'script' must not be empty", "", false},
		{"body over its cap", "POST", "/execute", `{"script": "` + strings.Repeat("x", 2<<20) + `"}`, 413, "ValidationError", "request body is over the limit", "", false},
		{"script over its cap", "POST", "/execute", scriptBody(strings.Repeat("#", 1<<20+1)), 413, "ValidationError", "'script' is over the limit", "", false},
		{"another path", "GET", "/", "", 404, "NotFound", "no such path", "", false},
		{"a path under /execute", "POST", "/execute/x", scriptBody("def main(): return 1"), 404, "NotFound", "no such path", "", false},
		{"GET /execute", "GET", "/execute", "", 405, "MethodNotAllowed", "method not allowed", "POST", false},
		{"POST /health", "POST", "/health", "", 405, "MethodNotAllowed", "method not allowed", "GET, HEAD", false},
		{"syntax error", "POST", "/execute", scriptBody("def main(:\n"), 422, "ExecutionError", "SyntaxError", "", true},
		{"exception", "POST", "/execute", scriptBody("def main():\n    raise ValueError('bad value')\n"), 422, "ExecutionError", "ValueError: bad value", "", true},
		{"main missing", "POST", "/execute", scriptBody("x = 1\n"), 422, "ExecutionError", "main() is missing or not callable", "", true},
		{"exit", "POST", "/execute", scriptBody("import sys\ndef main():\n    sys.exit(3)\n"), 422, "ExecutionError", "before main() returned", "", true},
		{"not JSON-serializable", "POST", "/execute", scriptBody("def main():\n    return {1}\n"), 422, "SerializationError", "main() must return JSON-serializable data", "", true},
		{"wall time", "POST", "/execute", scriptBody("import time\ndef main():\n    time.sleep(60)\n"), 422, "TimeoutError", "wall-clock limit", "", true},
		{"memory", "POST", "/execute", scriptBody("def main():\n    b = [bytearray(1 << 20) for _ in range(400)]\n"), 422, "ResourceLimitError", "memory limit", "", true},
	}
	for _, tt := range rows {
		t.Run(fmt.Sprint(tt.status, " ", tt.name), func(t *testing.T) {
			a := request(t, s.URL, tt.method, tt.path, tt.body, nil)
			e := errorBody(t, a.body)
			if a.header.Get("Content-Type") != "application/json" {
				t.Fatalf("not the contract's error shape (Content-Type %q): %s", a.header.Get("Content-Type"), a.body)
			}
			if a.status != tt.status || e.Error.Type != tt.typ || !strings.Contains(e.Error.Message, tt.message) ||
				a.header.Get("Allow") != tt.allow || (e.Stdout != nil) != tt.stdout {
				t.Fatalf("got %d Allow=%q %s; want %d %s %q Allow=%q, stdout present %v", a.status, a.header.Get("Allow"),
					a.body, tt.status, tt.typ, tt.message, tt.allow, tt.stdout)
			}
		})
	}
	t.Run("traceback", func(t *testing.T) {
		a := request(t, s.URL, "POST", "/execute", scriptBody("def main():\n    raise KeyError('k')\n"), nil)
		if !strings.Contains(string(a.body), `"traceback":"Traceback (most recent call last):`) {
			t.Fatalf("no traceback: %s", a.body)
		}
	})
	for _, path := range []string{"/health", "/healthz"} {
		if a := request(t, s.URL, "GET", path, "", nil); a.status != 200 {
			t.Errorf("GET %s: %d %s", path, a.status, a.body)
		}
	}

	// The logs: Cloud Logging's JSON, the request's trace named with the project the metadata server gave.
	if a := request(t, s.URL, "POST", "/execute", scriptBody("def main():\n    return 'traced'\n"),
		map[string]string{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}); a.status != 200 {
		t.Fatalf("%d %s", a.status, a.body)
	}
	// The execution entry is written once the answer is out.
	s.Await(t, "the traced request's execution entry", func() bool {
		for _, e := range s.Entries("execution") {
			if e["logging.googleapis.com/trace"] == "projects/meta-project/traces/0af7651916cd43dd8448eb211c80319c" {
				return true
			}
		}
		return false
	})
	// Logged before it (lines are read in order).
	if p := s.Entries("project for trace names"); len(p) != 1 || p[0]["from"] != "metadata" || p[0]["project_id"] != "meta-project" {
		t.Errorf("start-up entry %v", p)
	}
	if len(s.Entries("sandbox ready")) != 1 {
		t.Errorf("want one start-up self-check: %v", s.Entries("sandbox ready"))
	}
	for _, line := range s.Lines() {
		// With K_SERVICE set, the framework itself writes an empty line to stdout and stderr after each request.
		if strings.TrimSpace(line) == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil || m["severity"] == nil || m["message"] == nil || m["time"] == nil {
			t.Errorf("not a Cloud Logging entry: %q", line)
		}
	}
}

// A start-up that failed is tried again by a later request, but no sooner than SAFEPY_PREPARE_RETRY after the
// failure; until one succeeds, every request is refused (500 on /execute, 503 on the health check) with the kind
// of failure and Retry-After, and nothing runs. An invalid configuration is never retried: the environment does not
// change.
func TestFunctionsFrameworkRetriesAFailedStart(t *testing.T) {
	const retry = 2 * time.Second
	const failed = "the sandbox cannot run scripts: refusing to serve until a later attempt succeeds"
	hello := `{"script":"def main():\n    print('hello')\n    return {'ok': True}\n"}`
	nsjail := filepath.Join(t.TempDir(), "bin", "nsjail") // missing until the test puts it there
	s := startFramework(t, "SAFEPY_NSJAIL="+nsjail, "SAFEPY_PREPARE_RETRY="+retry.String(), "GOOGLE_CLOUD_PROJECT=test-project")
	s.WaitListening(t)

	// Requests for two and a half retry periods: enough for more than one attempt, and many more requests.
	requests := 0
	for begin := time.Now(); time.Since(begin) < retry*5/2; time.Sleep(20 * time.Millisecond) {
		i := requests
		requests++
		path, want := "/execute", 500
		if i%2 == 1 {
			path, want = "/health", 503
		}
		method := map[string]string{"/execute": "POST", "/health": "GET"}[path]
		a := request(t, s.URL, method, path, hello, nil)
		body := string(a.body)
		if a.status != want || !strings.Contains(body, `"type":"InternalError"`) || !strings.Contains(body, "the sandbox is unavailable") ||
			strings.Contains(body, "result") || strings.Contains(body, "stdout") || strings.Contains(body, nsjail) || a.header.Get("Retry-After") == "" {
			t.Fatalf("request %d: %d Retry-After=%q %s", i, a.status, a.header.Get("Retry-After"), body)
		}
	}
	// The sandbox becomes able to run: a later request's attempt succeeds.
	os.MkdirAll(filepath.Dir(nsjail), 0o755)
	runtimeDir := os.Getenv("SAFEPY_RUNTIME_DIR")
	if runtimeDir == "" {
		runtimeDir = filepath.Join(testserver.Root(), ".runtime")
	}
	if err := os.Symlink(filepath.Join(runtimeDir, "bin", "nsjail"), nsjail); err != nil {
		t.Fatal(err)
	}
	s.WaitHealthy(t)
	a := request(t, s.URL, "POST", "/execute", hello, nil)
	if a.status != 200 {
		t.Fatalf("%d %s", a.status, a.body)
	}
	jsonEqual(t, a.body, `{"result": {"ok": true}, "stdout": "hello\n"}`)

	// Logged before the first answer that followed it, and after every failed attempt.
	s.Await(t, "the recovery entry", func() bool { return len(s.Entries("the sandbox works now: serving")) > 0 })
	attempts := s.Entries(failed)
	if len(attempts) < 2 || len(attempts) >= requests/2 {
		t.Fatalf("%d failed attempts for %d requests: want more than one, and far fewer than the requests", len(attempts), requests)
	}
	var last time.Time
	for i, e := range attempts {
		at, err := time.Parse(time.RFC3339Nano, fmt.Sprint(e["time"]))
		if err != nil || e["severity"] != "ERROR" || e["attempt"] != float64(i+1) || !strings.Contains(fmt.Sprint(e["error"]), "nsjail") {
			t.Errorf("attempt entry %v", e)
		}
		// The next attempt is allowed from when the failure was recorded, a moment before it was logged.
		if i > 0 && at.Sub(last) < retry-100*time.Millisecond {
			t.Errorf("attempt %d came %s after the one before, want at least %s", i+1, at.Sub(last), retry)
		}
		last = at
	}
	if ok := s.Entries("the sandbox works now: serving"); len(ok) != 1 || ok[0]["failed_attempts"] != float64(len(attempts)) {
		t.Errorf("recovery entry %v after %d failed attempts", ok, len(attempts))
	}

	t.Run("invalid configuration", func(t *testing.T) {
		s := startFramework(t, "SAFEPY_SLOTS=many")
		s.WaitListening(t)
		for _, path := range []string{"/execute", "/health", "/execute"} {
			a := request(t, s.URL, map[string]string{"/execute": "POST", "/health": "GET"}[path], path, hello, nil)
			if a.status < 500 || !strings.Contains(string(a.body), "configuration is invalid") || a.header.Get("Retry-After") != "" {
				t.Fatalf("%s: %d Retry-After=%q %s", path, a.status, a.header.Get("Retry-After"), a.body)
			}
		}
		s.Cmd.Process.Kill() // all its output read: what it logged for these requests is all there is
		<-s.Done()
		if n := len(s.Entries("the configuration is invalid: refusing to serve")); n != 1 {
			t.Fatalf("%d log entries for the invalid configuration, want 1: %s", n, strings.Join(s.Lines(), "\n"))
		}
	})
}
