package safepy

// /mcp: the Model Context Protocol over Streamable HTTP, with one tool, run_python, that runs a script exactly as
// POST /execute does (Service.run) and gives the answer in the shapes a model reads: text, images, resources.

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/google/jsonschema-go/jsonschema"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/safe-py/safepy/internal/budget"
	"github.com/safe-py/safepy/sandbox"
)

// mcpCall is what the HTTP request behind a tool call gives the call: the request's context (its connection, for
// connlimit, and its trace, for the log) and the holds on the budget that must last until the answer is written,
// which is after the tool's handler returns.
type mcpCall struct {
	ctx   context.Context
	mu    sync.Mutex
	holds []*budget.Hold
}

type mcpCallKey struct{}

func (c *mcpCall) newHold(b *budget.Budget) *budget.Hold {
	h := b.NewHold()
	c.mu.Lock()
	c.holds = append(c.holds, h)
	c.mu.Unlock()
	return h
}

func (c *mcpCall) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, h := range c.holds {
		h.Release()
	}
	c.holds = nil
}

// newMCPHandler makes /mcp's handler. Stateless: each POST stands alone, so any instance behind Cloud Run's load
// balancer (or any process under the Functions Framework) serves any call, and a tool call holds no state anyway.
//
// Against DNS rebinding (a web page that makes a browser call a server on the user's loopback) the SDK refuses, by
// default, a request that arrives on a loopback address with a Host that is not loopback, and the standard
// library's cross-origin protection refuses a browser's cross-site POST (Sec-Fetch-Site or an Origin that is not
// the Host). Neither stands in Cloud Run's way: its requests arrive on no loopback address, and an agent is no
// browser and sends no Origin.
func (s *Service) newMCPHandler() (http.Handler, error) {
	server := mcp.NewServer(&mcp.Implementation{Name: "safe-py", Title: "safe-py: run Python in a sandbox", Version: "1"},
		&mcp.ServerOptions{Instructions: "Run Python scripts in a fresh sandbox with the run_python tool."})
	out, err := jsonschema.For[runOutput](&jsonschema.ForOptions{
		// Any JSON value; with a description, since an empty schema is written as `true`, which some clients (the
		// TypeScript SDK's) refuse as a property's schema.
		TypeSchemas: map[reflect.Type]*jsonschema.Schema{reflect.TypeFor[json.RawMessage](): {
			Description: "what main() returned, as JSON (absent on an error)"}}})
	if err != nil {
		return nil, fmt.Errorf("the tool's output schema: %w", err)
	}
	// The tool's handler is the SDK's plain one: the arguments come as the client sent them, for decodeBody, the
	// very decoder /execute's body goes through (the typed one would decode them first, loosely: the last of
	// duplicate keys, invalid UTF-8 replaced, no bound on what an array costs); and the structured content goes
	// out as encoded (the typed one validates it through float64s: 2**53+1 came back as 2**53, 10**400 failed the
	// call after the script ran). runOutput is this package's type, so it always has the schema's shape.
	server.AddTool(&mcp.Tool{
		Name:         "run_python",
		Title:        "Run Python",
		Description:  s.toolDescription(),
		InputSchema:  inputSchema(),
		OutputSchema: out,
		Annotations:  &mcp.ToolAnnotations{ReadOnlyHint: true, OpenWorldHint: new(bool)},
	}, s.runPython)
	h := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return server }, &mcp.StreamableHTTPOptions{
		Stateless: true, JSONResponse: true, Logger: s.log, MaxRequestBodyBytes: s.cfg.MaxBodyBytes})
	return http.NewCrossOriginProtection().Handler(h), nil
}

// toolDescription tells a model the contract's rules, with the limits this server's jails really have.
func (s *Service) toolDescription() string {
	l := s.runner.Limits()
	return fmt.Sprintf(`Run a Python 3 script in a fresh, isolated sandbox and return what main() returns.
- The script must define main() (no arguments). Its return value, which must be JSON-serializable (dicts, lists, str, int, float, bool, None), is the result. print() goes to stdout.
- numpy, pandas and matplotlib are installed; nothing else can be installed. There is no network.
- Limits: %s wall-clock time, %d MiB of memory, %d processes, %d MiB per file written.
- /sandbox is the working directory. files (optional) are written there before the script runs: [{"path": "data/in.csv", "content": "<base64>"}]. Files the script leaves there come back (images, e.g. plt.savefig("plot.png"), as images), at most %d files and %d MiB in all.
- Each call is a fresh sandbox: nothing (variables, files, imports) is kept between calls.`,
		l.Wall, l.MemoryBytes>>20, l.Processes, l.FileSizeMiB, sandbox.MaxFiles, sandbox.MaxOutputBytes>>20)
}

func inputSchema() *jsonschema.Schema {
	return &jsonschema.Schema{
		Type:     "object",
		Required: []string{"script"},
		Properties: map[string]*jsonschema.Schema{
			"script": {Type: "string", MinLength: jsonschema.Ptr(1),
				Description: "Python source that defines main(); main()'s return value is the result"},
			"files": {Type: "array", MaxItems: jsonschema.Ptr(sandbox.MaxFiles),
				Description: "input files, written under /sandbox before the script runs",
				Items: &jsonschema.Schema{
					Type:     "object",
					Required: []string{"path", "content"},
					Properties: map[string]*jsonschema.Schema{
						"path":    {Type: "string", Description: "relative path under /sandbox, e.g. data/in.csv"},
						"content": {Type: "string", ContentEncoding: "base64", Description: "the file's bytes in standard base64"},
					},
					AdditionalProperties: &jsonschema.Schema{Not: &jsonschema.Schema{}},
				}},
		},
		AdditionalProperties: &jsonschema.Schema{Not: &jsonschema.Schema{}},
	}
}

// runPython is the tool: the arguments decoded as /execute decodes a body, then Service.run.
func (s *Service) runPython(ctx context.Context, creq *mcp.CallToolRequest) (*mcp.CallToolResult, error) {
	call, _ := ctx.Value(mcpCallKey{}).(*mcpCall)
	if call == nil { // not through serveMCP: nothing to keep the answer's room until it is written
		call = &mcpCall{ctx: ctx}
		defer call.release()
	}
	// The HTTP request's values (its connection, its trace) with the cancellation of both the request and the call.
	rctx, cancel := context.WithCancel(call.ctx)
	defer cancel()
	defer context.AfterFunc(ctx, cancel)()

	begin := time.Now()
	args := []byte(creq.Params.Arguments)
	req, _, verr := decodeBody(args, s.cfg.MaxScriptBytes, s.runner.Limits().TmpfsInodes)
	if verr != nil {
		s.logCall(rctx, begin, []slog.Attr{slog.String("outcome", verr.Type)})
		// decodeBody speaks of a request body; here that is the tool's arguments.
		msg := strings.Replace(verr.Message, "request body", "the arguments", 1)
		return errorResult(&toolError{Type: verr.Type, Message: msg}, nil)
	}
	args = nil
	held := call.newHold(s.mem)
	if !held.TryGrow(req.size()) {
		return s.refuse(rctx, begin, nil, &refusal{retryAfter: time.Second, message: errBodyBudget.Error()})
	}
	x := s.run(rctx, &req, held, mcpAnswerBytes)
	switch {
	case x.refused != nil:
		return s.refuse(rctx, begin, x.entry, x.refused)
	case x.answer == nil:
		s.logCall(rctx, begin, x.entry)
		return nil, fmt.Errorf("the call was canceled: %w", context.Cause(rctx))
	}
	s.logCall(rctx, begin, x.entry)
	a := x.answer
	if a.err != nil {
		// An internal error's message is the generic one run made; its cause is in the log only.
		return errorResult(&toolError{Type: a.err.Type, Message: a.err.Message, Limit: a.err.Limit, Traceback: a.err.Traceback}, a.out)
	}
	return toolResult(a.out, nil)
}

// refuse is the tool's 503: an error result that says when to retry.
func (s *Service) refuse(ctx context.Context, begin time.Time, entry []slog.Attr, ref *refusal) (*mcp.CallToolResult, error) {
	s.logCall(ctx, begin, append(entry, slog.String("outcome", "Overloaded")))
	secs := retrySeconds(ref.retryAfter)
	return errorResult(&toolError{Type: "Overloaded", RetryAfterSeconds: secs,
		Message: fmt.Sprintf("%s (retry after %d seconds)", ref.message, secs)}, nil)
}

// logCall writes a tool call's log entry, as /execute writes one per request (less the HTTP request, which is the
// SDK's and may carry other messages).
func (s *Service) logCall(ctx context.Context, begin time.Time, entry []slog.Attr) {
	level := slog.LevelInfo
	for _, a := range entry {
		if a.Key == "outcome" && a.Value.String() == "InternalError" {
			level = slog.LevelError
		} else if a.Key == "outcome" && a.Value.String() == "Overloaded" {
			level = slog.LevelWarn
		}
	}
	s.log.LogAttrs(ctx, level, "execution", append(entry, slog.String("via", "mcp"),
		slog.Float64("call_ms", ms(time.Since(begin))))...)
}
