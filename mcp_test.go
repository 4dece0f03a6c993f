package safepy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image/png"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// These tests speak to /mcp of the real server (srv: the function over real HTTP on 127.0.0.1, real jails) with the
// SDK's own client over Streamable HTTP, as an agent would.

func mcpSession(t *testing.T, base string) *mcp.ClientSession {
	t.Helper()
	client := mcp.NewClient(&mcp.Implementation{Name: "safepy-test", Version: "1"}, nil)
	cs, err := client.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: base + "/mcp"}, nil)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { cs.Close() })
	return cs
}

func callRunPython(t *testing.T, cs *mcp.ClientSession, args map[string]any) (*mcp.CallToolResult, runOutput) {
	t.Helper()
	res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "run_python", Arguments: args})
	if err != nil {
		t.Fatalf("call: %v", err)
	}
	var out runOutput
	b, _ := json.Marshal(res.StructuredContent)
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("structured content %s: %v", b, err)
	}
	return res, out
}

func textOf(res *mcp.CallToolResult) string {
	var b strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*mcp.TextContent); ok {
			b.WriteString(tc.Text)
		}
	}
	return b.String()
}

func TestMCPListTools(t *testing.T) {
	cs := mcpSession(t, srv.URL)
	if got := cs.InitializeResult().ServerInfo.Name; got != "safe-py" {
		t.Errorf("server name %q", got)
	}
	tools, err := cs.ListTools(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(tools.Tools) != 1 || tools.Tools[0].Name != "run_python" {
		t.Fatalf("tools %+v", tools.Tools)
	}
	tool := tools.Tools[0]
	schema, _ := json.Marshal(tool.InputSchema)
	for _, want := range []string{`"required":["script"]`, `"files"`, `"path"`, `"content"`} {
		if !bytes.Contains(schema, []byte(want)) {
			t.Errorf("input schema lacks %s: %s", want, schema)
		}
	}
	// The limits come from the jail's definition, not from the code.
	l := shared.ready.Load().runner.Limits()
	for _, want := range []string{"main()", "numpy", "matplotlib", "no network", "/sandbox", "fresh sandbox",
		l.Wall.String(), fmt.Sprintf("%d MiB of memory", l.MemoryBytes>>20), fmt.Sprintf("%d processes", l.Processes)} {
		if !strings.Contains(tool.Description, want) {
			t.Errorf("description lacks %q:\n%s", want, tool.Description)
		}
	}
}

// The contract's examples, through the tool: the same result and stdout as /execute's; the fourth ({}) is a
// malformed call, which the SDK refuses against the input schema, and nothing runs.
// onBothMCPPaths runs fn against the shared service (its jails forked from fork servers) and against a service of
// its own whose every jail is cold: a tool call takes the same path as /execute on either.
func onBothMCPPaths(t *testing.T, fn func(t *testing.T, base string)) {
	t.Run("forked", func(t *testing.T) { fn(t, srv.URL) })
	t.Run("cold", func(t *testing.T) {
		cfg, err := ConfigFromEnv()
		if err != nil {
			t.Fatal(err)
		}
		cfg.Sandbox.ForkServers = false
		svc, err := NewService(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatal(err)
		}
		if path := svc.JailPath(); path != "cold" {
			t.Fatalf("jails are %s", path)
		}
		ts := httptest.NewServer(svc)
		t.Cleanup(func() { ts.Close(); svc.Close() })
		fn(t, ts.URL)
	})
}

func TestMCPContractExamples(t *testing.T) { onBothMCPPaths(t, mcpContractExamples) }

func mcpContractExamples(t *testing.T, base string) {
	cs := mcpSession(t, base)
	for _, tt := range contractExamples {
		t.Run(tt.name, func(t *testing.T) {
			var args map[string]any
			if err := json.Unmarshal([]byte(tt.body), &args); err != nil {
				t.Fatal(err)
			}
			res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "run_python", Arguments: args})
			if tt.status != http.StatusOK {
				if err == nil && !res.IsError {
					t.Fatalf("a call without script was accepted: %+v", res)
				}
				if err == nil && !strings.Contains(textOf(res), "script") {
					t.Fatalf("the refusal does not name the argument: %s", textOf(res))
				}
				return
			}
			if err != nil || res.IsError {
				t.Fatalf("call: %v %s", err, textOf(res))
			}
			var want struct {
				Result json.RawMessage `json:"result"`
				Stdout string          `json:"stdout"`
			}
			json.Unmarshal([]byte(tt.want), &want)
			got, _ := json.Marshal(res.StructuredContent)
			var out runOutput
			json.Unmarshal(got, &out)
			jsonEqual(t, out.Result, string(want.Result))
			if out.Stdout != want.Stdout || out.Stderr != "" || len(out.Files) != 0 || out.Error != nil {
				t.Fatalf("structured content %s, want stdout %q", got, want.Stdout)
			}
			text := textOf(res)
			if !strings.Contains(text, "result (JSON):") || !strings.Contains(text, "stdout:\n"+want.Stdout) {
				t.Fatalf("text:\n%s", text)
			}
		})
	}
}

func TestMCPCalls(t *testing.T) { onBothMCPPaths(t, mcpCalls) }

func mcpCalls(t *testing.T, base string) {
	cs := mcpSession(t, base)
	plot := "def main():\n    import matplotlib\n    matplotlib.use('Agg')\n    import matplotlib.pyplot as plt\n" +
		"    plt.plot([1, 2, 3], [1, 4, 9])\n    plt.savefig('plot.png')\n    open('notes.txt', 'w').write('hi')\n    return 'drawn'\n"
	tests := []struct {
		name    string
		args    map[string]any
		isError bool
		check   func(t *testing.T, res *mcp.CallToolResult, out runOutput)
	}{
		{"plot", map[string]any{"script": plot}, false, func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
			if len(out.Files) != 2 || out.Files[1].Path != "plot.png" || out.Files[0].Path != "notes.txt" {
				t.Fatalf("files %+v", out.Files)
			}
			var images, resources int
			for _, c := range res.Content {
				switch c := c.(type) {
				case *mcp.ImageContent:
					images++
					if c.MIMEType != "image/png" {
						t.Errorf("image MIME type %q", c.MIMEType)
					}
					img, err := png.Decode(bytes.NewReader(c.Data))
					if err != nil || img.Bounds().Dx() < 100 || int64(len(c.Data)) != out.Files[1].Size {
						t.Errorf("image: %v (%d bytes, %d said)", err, len(c.Data), out.Files[1].Size)
					}
				case *mcp.EmbeddedResource:
					resources++
					r := c.Resource
					if r.URI != "file:///sandbox/notes.txt" || !strings.HasPrefix(r.MIMEType, "text/plain") || string(r.Blob) != "hi" {
						t.Errorf("resource %s %s %q", r.URI, r.MIMEType, r.Blob)
					}
				}
			}
			if images != 1 || resources != 1 {
				t.Fatalf("%d images and %d resources, want 1 and 1", images, resources)
			}
			if text := textOf(res); !strings.Contains(text, "- plot.png (") || !strings.Contains(text, `"drawn"`) {
				t.Fatalf("text:\n%s", text)
			}
		}},
		{"input file", map[string]any{"script": "def main():\n    import pandas as pd\n    return int(pd.read_csv('data/in.csv')['a'].sum())\n",
			"files": []any{fileEntry("data/in.csv", []byte("a\n1\n2\n39\n"))}}, false,
			func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
				if string(out.Result) != "42" || len(out.Files) != 0 {
					t.Fatalf("result %s, files %+v", out.Result, out.Files)
				}
			}},
		{"stderr", map[string]any{"script": "import sys\ndef main():\n    print('to err', file=sys.stderr)\n    return None\n"}, false,
			func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
				if string(out.Result) != "null" || out.Stderr != "to err\n" || !strings.Contains(textOf(res), "stderr:\nto err\n") {
					t.Fatalf("result %s, stderr %q, text:\n%s", out.Result, out.Stderr, textOf(res))
				}
			}},
		{"syntax error", map[string]any{"script": "def main(:\n    return 1\n"}, true,
			func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
				if out.Error == nil || out.Error.Type != "ExecutionError" || !strings.Contains(out.Error.Message, "SyntaxError") {
					t.Fatalf("error %+v", out.Error)
				}
				if text := textOf(res); !strings.HasPrefix(text, "ExecutionError: ") || !strings.Contains(text, "SyntaxError") {
					t.Fatalf("text:\n%s", text)
				}
			}},
		{"exception with traceback", map[string]any{"script": "def main():\n    print('before')\n    raise ValueError('boom')\n"}, true,
			func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
				text := textOf(res)
				if out.Error == nil || out.Error.Traceback == "" || !strings.Contains(text, "traceback:\n") ||
					!strings.Contains(text, "ValueError: boom") || !strings.Contains(text, "stdout:\nbefore\n") {
					t.Fatalf("error %+v, text:\n%s", out.Error, text)
				}
			}},
		{"timeout", map[string]any{"script": "def main():\n    while True:\n        pass\n"}, true,
			func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
				if out.Error == nil || out.Error.Type != "TimeoutError" || out.Error.Limit == "" ||
					!strings.Contains(textOf(res), "TimeoutError: ") || !strings.Contains(textOf(res), "limit: ") {
					t.Fatalf("error %+v, text:\n%s", out.Error, textOf(res))
				}
			}},
		{"not serializable", map[string]any{"script": "def main():\n    return {1, 2}\n"}, true,
			func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
				if out.Error == nil || out.Error.Type != "SerializationError" {
					t.Fatalf("error %+v", out.Error)
				}
			}},
		{"bad file path", map[string]any{"script": "def main():\n    return 1\n",
			"files": []any{fileEntry("../x", nil)}}, true,
			func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
				if out.Error == nil || out.Error.Type != "ValidationError" || !strings.Contains(out.Error.Message, `files[0] ("../x")`) {
					t.Fatalf("error %+v", out.Error)
				}
			}},
		{"bad base64", map[string]any{"script": "def main():\n    return 1\n",
			"files": []any{map[string]string{"path": "a", "content": "!!"}}}, true,
			func(t *testing.T, res *mcp.CallToolResult, out runOutput) {
				if out.Error == nil || !strings.Contains(out.Error.Message, "not valid base64") {
					t.Fatalf("error %+v", out.Error)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, out := callRunPython(t, cs, tt.args)
			if res.IsError != tt.isError {
				t.Fatalf("IsError %v, want %v:\n%s", res.IsError, tt.isError, textOf(res))
			}
			tt.check(t, res, out)
		})
	}
}

// A malformed call is refused by the SDK against the input schema, before anything runs.
func TestMCPMalformedCalls(t *testing.T) {
	cs := mcpSession(t, srv.URL)
	for name, args := range map[string]map[string]any{
		"script not a string": {"script": 42},
		"unknown argument":    {"script": "def main():\n    return 1\n", "extra": true},
		"files not an array":  {"script": "def main():\n    return 1\n", "files": "a.csv"},
		"file without path":   {"script": "def main():\n    return 1\n", "files": []any{map[string]string{"content": ""}}},
	} {
		t.Run(name, func(t *testing.T) {
			res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "run_python", Arguments: args})
			if err == nil && !res.IsError {
				t.Fatalf("accepted: %s", textOf(res))
			}
		})
	}
}

// A body over the service's cap is refused as /execute refuses one, before the SDK reads it; the session stays
// usable.
func TestMCPOversizedCall(t *testing.T) {
	cs := mcpSession(t, srv.URL)
	big := "def main():\n    return 1\n#" + strings.Repeat("x", int(shared.ready.Load().cfg.MaxBodyBytes)) + "\n"
	res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "run_python", Arguments: map[string]any{"script": big}})
	if err == nil && !res.IsError {
		t.Fatalf("an oversized call was run: %s", textOf(res))
	}
	t.Logf("oversized call: %v", err)
	// And over plain HTTP, the contract's 413.
	r := do(t, http.MethodPost, "/mcp", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run_python","arguments":{"script":"`+
		strings.Repeat("x", int(shared.ready.Load().cfg.MaxBodyBytes))+`"}}}`)
	if r.status != http.StatusRequestEntityTooLarge {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	if _, out := callRunPython(t, cs, map[string]any{"script": "def main():\n    return 7\n"}); string(out.Result) != "7" {
		t.Fatalf("after the oversized call: %+v", out)
	}
}

// Several sessions at once, each call its own jail and its own answer.
func TestMCPConcurrentSessions(t *testing.T) {
	const n = 6
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := mcp.NewClient(&mcp.Implementation{Name: fmt.Sprintf("agent-%d", i), Version: "1"}, nil)
			cs, err := client.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: srv.URL + "/mcp"}, nil)
			if err != nil {
				errs <- err
				return
			}
			defer cs.Close()
			for j := range 2 {
				script := fmt.Sprintf("import os\ndef main():\n    print(%d)\n    return {'i': %d, 'j': %d, 'files': os.listdir('.')}\n", i, i, j)
				res, err := cs.CallTool(context.Background(), &mcp.CallToolParams{Name: "run_python", Arguments: map[string]any{"script": script,
					"files": []any{fileEntry(fmt.Sprintf("mine-%d", i), nil)}}})
				if err != nil {
					errs <- err
					return
				}
				b, _ := json.Marshal(res.StructuredContent)
				var out runOutput
				json.Unmarshal(b, &out)
				want := fmt.Sprintf(`{"i":%d,"j":%d,"files":["mine-%d"]}`, i, j, i)
				if res.IsError || !sameJSON(out.Result, want) || out.Stdout != fmt.Sprintf("%d\n", i) {
					errs <- fmt.Errorf("session %d call %d: %s, want %s; %s", i, j, b, want, textOf(res))
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Origin and Host: a browser's cross-site request and a rebound name on loopback are refused; an agent's request
// (no Origin) and a same-origin one are served.
func TestMCPOriginAndHost(t *testing.T) {
	list := `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}`
	tests := []struct {
		name   string
		header map[string]string
		host   string
		status int
	}{
		{"agent", nil, "", http.StatusOK},
		{"same origin", map[string]string{"Origin": srv.URL}, "", http.StatusOK},
		{"cross-site browser", map[string]string{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, "", http.StatusForbidden},
		{"cross origin", map[string]string{"Origin": "https://evil.example"}, "", http.StatusForbidden},
		{"rebound host", nil, "evil.example", http.StatusForbidden},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodPost, srv.URL+"/mcp", strings.NewReader(list))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Accept", "application/json, text/event-stream")
			for k, v := range tt.header {
				req.Header.Set(k, v)
			}
			if tt.host != "" {
				req.Host = tt.host
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.status)
			}
		})
	}
}

// The function under the Functions Framework's own server serves /mcp too: the same ServeHTTP.
func TestMCPUnderFuncframework(t *testing.T) {
	s := startFramework(t)
	s.WaitHealthy(t)
	cs := mcpSession(t, s.URL)
	if _, out := callRunPython(t, cs, map[string]any{"script": "def main():\n    return [1, 2]\n"}); !sameJSON(out.Result, "[1,2]") {
		t.Fatalf("result %s", out.Result)
	}
}

// sameJSON says whether two JSON texts are the same values (a client decodes structured content into maps, whose
// keys it writes back sorted).
func sameJSON(got json.RawMessage, want string) bool {
	var a, b any
	return json.Unmarshal(got, &a) == nil && json.Unmarshal([]byte(want), &b) == nil && reflect.DeepEqual(a, b)
}

// mcpPost sends one raw message to /mcp as a Streamable HTTP client would, without a session (the server is
// stateless).
func mcpPost(t *testing.T, body string) response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/mcp", strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{resp.StatusCode, resp.Header, b}
}

func toolCall(args string) string {
	return `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"run_python","arguments":` + args + `}}`
}

// What the SDK would take loosely, or hold open, is refused before it sees it, as /execute refuses such a body: one
// message per request (a batch was many calls past the gate and Cloud Run's concurrency in one request), only the
// methods a client of the one tool needs (subscriptions/listen held its stream, and 4x its body of the budget, for
// as long as the client liked), ids that are strings or integers, the checks of checkJSON over the whole message
// (a 2 MiB message of empty arrays took the SDK's decoder to 100 MiB), and arguments decoded as /execute decodes a
// body (the SDK's decoder ran the last of duplicate scripts, and replaced invalid UTF-8).
func TestMCPRefusedAtTheEdge(t *testing.T) {
	one := `"def main():\n    return 1\n"`
	tests := []struct {
		name, body string
		status     int
		code       int    // the JSON-RPC error's; 0: a tool error (isError) with this message
		message    string // in the error's message
	}{
		{"batch", `[` + toolCall(`{"script":`+one+`}`) + `,` + toolCall(`{"script":`+one+`}`) + `]`, 400, rpcInvalidRequest, "batches are not served"},
		{"a method that holds its stream", `{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{}}`, 400, rpcNoSuchMethod, "subscriptions/listen"},
		{"resources/read", `{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///etc/passwd"}}`, 400, rpcNoSuchMethod, "not served"},
		{"a fractional id", `{"jsonrpc":"2.0","id":1.5,"method":"ping"}`, 400, rpcInvalidRequest, "id must be"},
		{"an object id", `{"jsonrpc":"2.0","id":{},"method":"ping"}`, 400, rpcInvalidRequest, "id must be"},
		{"a response", `{"jsonrpc":"2.0","id":1,"result":{}}`, 400, rpcInvalidRequest, "not a request"},
		{"many empty arrays", toolCall(`{"script":` + one + `,"files":[` + strings.Repeat("[],", 5000) + `[]]}`), 400, rpcParseError, "more than 1024 elements"},
		{"deep nesting", toolCall(strings.Repeat(`{"a":`, 40) + `1` + strings.Repeat(`}`, 40)), 400, rpcParseError, "nested"},
		{"duplicate scripts", toolCall(`{"script":` + one + `,"script":"def main():\n    return 2\n"}`), 400, rpcParseError, "duplicate key"},
		{"duplicate method", `{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}`, 400, rpcParseError, "duplicate key"},
		{"invalid UTF-8", toolCall(`{"script":"def main():\n    return '` + "\xff" + `'\n"}`), 400, rpcParseError, "not valid UTF-8"},
		{"lone surrogate", toolCall(`{"script":"def main():\n    return '\ud800'\n"}`), 400, rpcParseError, "surrogate"},
		{"an unknown argument", toolCall(`{"script":` + one + `,"extra":1}`), 200, 0, `unknown field "extra"`},
		{"no arguments", `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"run_python"}}`, 200, 0, "the arguments must be a JSON object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := mcpPost(t, tt.body)
			var m struct {
				Error *struct {
					Code    int
					Message string
				}
				Result *struct {
					IsError bool
					Content []struct{ Text string }
				}
			}
			if err := json.Unmarshal(r.body, &m); err != nil || r.status != tt.status {
				t.Fatalf("%d %s", r.status, r.body)
			}
			switch {
			case tt.code != 0 && (m.Error == nil || m.Error.Code != tt.code || !strings.Contains(m.Error.Message, tt.message)):
				t.Fatalf("want JSON-RPC error %d with %q: %s", tt.code, tt.message, r.body)
			case tt.code == 0 && (m.Result == nil || !m.Result.IsError || len(m.Result.Content) == 0 ||
				!strings.Contains(m.Result.Content[0].Text, tt.message)):
				t.Fatalf("want a tool error with %q: %s", tt.message, r.body)
			}
		})
	}
	// The ordinary messages still pass.
	for _, body := range []string{`{"jsonrpc":"2.0","id":"a-string","method":"ping"}`, `{"jsonrpc":"2.0","id":3,"method":"tools/list"}`,
		toolCall(`{"script":` + one + `}`)} {
		var m struct{ Error any }
		if r := mcpPost(t, body); r.status != 200 || json.Unmarshal(r.body, &m) != nil || m.Error != nil {
			t.Errorf("%s: %d %s", body, r.status, r.body)
		}
	}
}

// main()'s result reaches the structured content exactly as the script made it: no trip through float64.
func TestMCPResultIsExact(t *testing.T) {
	const want = `{"big": 9007199254740993, "huge": 1` + "%s" + `, "one": 1.0, "negative_zero": -0.0, "digits": 12345678901234567891}`
	r := mcpPost(t, toolCall(`{"script":"def main():\n    return {'big': 2**53 + 1, 'huge': 10**400, 'one': 1.0, 'negative_zero': -0.0, 'digits': 12345678901234567891}\n"}`))
	var m struct {
		Result struct {
			IsError           bool
			StructuredContent struct{ Result json.RawMessage }
		}
	}
	if err := json.Unmarshal(r.body, &m); err != nil || r.status != 200 || m.Result.IsError {
		t.Fatalf("%d %s", r.status, r.body)
	}
	t.Logf("structured result: %.120s", m.Result.StructuredContent.Result)
	jsonEqual(t, m.Result.StructuredContent.Result, fmt.Sprintf(want, strings.Repeat("0", 400)))
}
