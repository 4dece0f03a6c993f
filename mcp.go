package safepy

// /mcp: the Model Context Protocol over Streamable HTTP, with one tool, run_python, that runs a script exactly as
// POST /execute does (Service.run) and gives the answer in the shapes a model reads: text, images, resources.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"path"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/google/jsonschema-go/jsonschema"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/safe-py/safepy/internal/budget"
	"github.com/safe-py/safepy/internal/cloudlog"
	"github.com/safe-py/safepy/internal/pace"
	"github.com/safe-py/safepy/sandbox"
)

// mcpTextCap bounds each of stdout, stderr and main()'s result in the text for the model; the structured content
// has them whole. A model reads a few pages, not a mebibyte, and the text is most of what an answer costs to encode.
const mcpTextCap = 64 << 10

// mcpAnswerBytes is what an answer holds while the tool's result is made and sent, every string at its length in
// JSON (a control byte is six): the outcome (size), the text for the model and the structured content, then the
// SDK's encoding of the whole response, twice over while its buffer grows; files as base64 in the outcome and in
// the response, and decoded between.
func mcpAnswerBytes(a *answer) int64 {
	var structured, files int64
	if a.err != nil {
		structured += jsonLen(a.err.Message) + jsonLen(a.err.Traceback)
	}
	if o := a.out; o != nil {
		structured += jsonLen(o.Stdout) + jsonLen(o.Stderr) + int64(len(o.Result))
		for _, f := range o.Files {
			files += int64(len(f.Content)) + jsonLen(f.Path) + 256
		}
		for _, f := range o.FilesOmitted {
			structured += jsonLen(f.Path) + 64
		}
	}
	return mcpCharge(a.size(), structured+8<<10, files)
}

// mcpCharge is mcpAnswerBytes's sum, of an answer's size, its structured content's encoded length and its files'
// base64; the text for the model is at most the structured content and its own caps' worth (each shown part of at
// most mcpTextCap bytes six times over, and json.Indent's spaces of a short result).
func mcpCharge(size, structured, files int64) int64 {
	text := min(structured, 6*3*mcpTextCap) + 4*mcpIndentMax + 8<<10
	return size + 3*(text+structured) + 3*files
}

// jsonLen is the length of s as a JSON string, as encoding/json writes it (HTML characters escaped).
func jsonLen(s string) int64 {
	n := int64(2)
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1, r == '\u2028', r == '\u2029':
			n += 6
		case r == '"' || r == '\\' || r == '\n' || r == '\r' || r == '\t':
			n += 2
		case r < 0x20 || r == '<' || r == '>' || r == '&':
			n += 6
		default:
			n += int64(size)
		}
		i += size
	}
	return n
}

// runOutput is the tool's structured content: the contract's answer less the files' contents (which come as image
// and resource content), with error set when the script failed or the call was refused.
type runOutput struct {
	Result          json.RawMessage `json:"result,omitempty"`
	Stdout          string          `json:"stdout"`
	StdoutTruncated bool            `json:"stdout_truncated"`
	Stderr          string          `json:"stderr"`
	StderrTruncated bool            `json:"stderr_truncated"`
	Files           []mcpFile       `json:"files"`
	FilesTruncated  bool            `json:"files_truncated"`
	FilesOmitted    []mcpFile       `json:"files_omitted"`
	Error           *toolError      `json:"error,omitempty"`
}

type mcpFile struct {
	Path string `json:"path"`
	Size int64  `json:"size"`
}

type toolError struct {
	Type              string `json:"type"`
	Message           string `json:"message"`
	Limit             string `json:"limit,omitempty"`
	Traceback         string `json:"traceback,omitempty"`
	RetryAfterSeconds int    `json:"retry_after_seconds,omitempty"`
}

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

// serveMCP caps and reads the body as /execute does (the same cap, the same budget, the same pace), then hands the
// request to the SDK with the body in memory.
func (s *Service) serveMCP(w http.ResponseWriter, r *http.Request) {
	call := &mcpCall{ctx: cloudlog.WithRequest(r.Context(), r)}
	defer call.release()
	if r.Method == http.MethodPost {
		held := call.newHold(s.mem)
		head := &prefix{max: 4 << 10}
		r.Body = struct {
			io.Reader
			io.Closer
		}{io.TeeReader(r.Body, head), r.Body}
		body, status, aerr := readBody(w, r, held, s.cfg.MaxBodyBytes)
		if aerr != nil {
			rpcError(w, status, requestID(head.b), aerr.Message, rpcInvalidRequest)
			return
		}
		// The SDK reads the body whole and parses it: a few times its size for a moment, as for /execute.
		if !held.TryGrow(decodeCost * int64(len(body))) {
			rpcError(w, http.StatusServiceUnavailable, requestID(body), errBodyBudget.Error(), rpcInvalidRequest)
			return
		}
		if code, why := checkMCPMessage(body); why != "" {
			s.log.LogAttrs(call.ctx, slog.LevelWarn, "mcp request refused", slog.String("reason", why),
				slog.Int("body_bytes", len(body)))
			rpcError(w, http.StatusBadRequest, requestID(body), why, code)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	// The SDK writes the answer whole; it is sent at answerRate or faster, as /execute's is, and a client that
	// reads slower is cut off rather than holding the answer's room until the server's write timeout.
	pw := &pacedResponse{ResponseWriter: w, rc: http.NewResponseController(w)}
	s.mcp.ServeHTTP(pw, r.WithContext(context.WithValue(r.Context(), mcpCallKey{}, call)))
	if err := pw.finish(); err != nil {
		s.log.LogAttrs(call.ctx, slog.LevelWarn, "mcp answer not sent", slog.Int64("written_bytes", pw.written()),
			slog.Float64("writing_ms", ms(time.Since(pw.began()))), slog.String("error", err.Error()))
	}
}

// pacedResponse sends what is written to it through a pace.Writer from the first write on.
type pacedResponse struct {
	http.ResponseWriter
	rc  *http.ResponseController
	pw  *pace.Writer
	err error
}

func (p *pacedResponse) Write(b []byte) (int, error) {
	if p.pw == nil {
		p.pw = &pace.Writer{W: p.ResponseWriter, Rate: answerRate, Start: time.Now(),
			SetDeadline: func(t time.Time) error { return unsupportedOK(p.rc.SetWriteDeadline(t)) }}
	}
	n, err := p.pw.Write(b)
	if err != nil && p.err == nil {
		p.err = err
	}
	return n, err
}

func (p *pacedResponse) Flush() { _ = p.rc.Flush() }

func (p *pacedResponse) Unwrap() http.ResponseWriter { return p.ResponseWriter }

// finish sends what the server still buffers within the pace, and clears the deadline for the connection's next
// request; it returns the first error of the answer's writing.
func (p *pacedResponse) finish() error {
	if p.pw == nil || p.err != nil {
		return p.err
	}
	err := p.pw.Flush(func() error { return unsupportedOK(p.rc.Flush()) })
	if err == nil {
		err = unsupportedOK(p.rc.SetWriteDeadline(time.Time{}))
	}
	return err
}

func (p *pacedResponse) began() time.Time {
	if p.pw == nil {
		return time.Now()
	}
	return p.pw.Start
}

func (p *pacedResponse) written() int64 {
	if p.pw == nil {
		return 0
	}
	return p.pw.Written()
}

// rpcError refuses a request the SDK never saw with the HTTP status /execute would give it, and a JSON-RPC error
// as the body: a client reads that as this one request's failure and keeps its session (a bare status ends it).
func rpcError(w http.ResponseWriter, status int, id any, message string, code int) {
	if status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	b, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": id,
		"error": map[string]any{"code": code, "message": message}})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// JSON-RPC's error codes for a message refused before the SDK sees it.
const (
	rpcParseError     = -32700
	rpcInvalidRequest = -32600
	rpcNoSuchMethod   = -32601
)

// mcpMethods are the requests /mcp serves: what a client needs to find and call the one tool. Everything else the
// SDK knows (subscriptions/listen, which holds its stream open for as long as the client likes; resources/read;
// completions) has no use here and is refused before the SDK sees it. Notifications (no answer, no stream) pass.
var mcpMethods = map[string]bool{"initialize": true, "ping": true, "tools/list": true, "tools/call": true,
	"resources/list": true, "resources/templates/list": true, "prompts/list": true}

// checkMCPMessage holds a JSON-RPC message to what /execute holds a body to before the SDK parses it: valid UTF-8,
// one JSON object (no batch: one HTTP request is one call, so the admission gate and Cloud Run's concurrency count
// calls), no duplicate keys, no lone surrogates, bounded keys, elements and depth (checkJSON); an id that is a
// string or an integer; and a method of mcpMethods. It returns a JSON-RPC error code and why ("" if it passes).
func checkMCPMessage(body []byte) (int, string) {
	if !utf8.Valid(body) {
		return rpcParseError, fmt.Sprintf("the message is not valid UTF-8 (at byte %d)", invalidUTF8At(body))
	}
	if start := bytes.TrimLeft(body, " \t\r\n"); len(start) > 0 && start[0] == '[' {
		return rpcInvalidRequest, "batches are not served: send one JSON-RPC message per request"
	}
	if err := checkJSON(body); err != nil {
		return rpcParseError, strings.Replace(err.Error(), "request body", "the message", 1)
	}
	var m struct {
		ID     json.RawMessage `json:"id"`
		Method string          `json:"method"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		return rpcInvalidRequest, "the message is not a JSON-RPC request"
	}
	if len(m.ID) > 0 && !jsonrpcID.Match(m.ID) {
		return rpcInvalidRequest, "the message's id must be a string or an integer"
	}
	switch {
	case m.Method == "":
		return rpcInvalidRequest, "the message is not a request: this server sends no requests to answer"
	case strings.HasPrefix(m.Method, "notifications/"), mcpMethods[m.Method]:
		return 0, ""
	}
	return rpcNoSuchMethod, fmt.Sprintf("method %s is not served here", strconv.Quote(clip(m.Method, 100)))
}

// jsonrpcID matches the ids checkMCPMessage accepts: a string, or an integer of at most 18 digits (any int64).
var jsonrpcID = regexp.MustCompile(`^("(?:[^"\\]|\\.)*"|-?[0-9]{1,18})$`)

// prefix keeps the first max bytes written to it.
type prefix struct {
	b   []byte
	max int
}

func (p *prefix) Write(b []byte) (int, error) {
	if n := min(len(b), p.max-len(p.b)); n > 0 {
		p.b = append(p.b, b[:n]...)
	}
	return len(b), nil
}

// requestID finds a JSON-RPC request's id in the start of its body (a body refused for its size is not read whole):
// clients write it before the params. nil when it is not there.
func requestID(head []byte) any {
	dec := json.NewDecoder(bytes.NewReader(head))
	dec.UseNumber()
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil
	}
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			return nil
		}
		var v any
		if err := dec.Decode(&v); err != nil {
			return nil
		}
		if key == "id" {
			switch v.(type) {
			case json.Number, string:
				return v
			}
			return nil
		}
	}
	return nil
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

func errorResult(e *toolError, o *sandbox.Outcome) (*mcp.CallToolResult, error) {
	res, err := toolResult(o, e)
	if res != nil {
		res.IsError = true
	}
	return res, err
}

// toolResult makes the tool's result of an outcome (nil when the script did not start) and an error (nil on
// success): the structured content (runOutput, encoded here: main()'s result goes as the script made it), a text
// for the model, each image as an image and each other file as a resource.
func toolResult(o *sandbox.Outcome, e *toolError) (*mcp.CallToolResult, error) {
	out := &runOutput{Files: []mcpFile{}, FilesOmitted: []mcpFile{}, Error: e}
	if o != nil {
		if e == nil {
			out.Result = o.Result
		}
		out.Stdout, out.StdoutTruncated, out.Stderr, out.StderrTruncated = o.Stdout, o.StdoutTruncated, o.Stderr, o.StderrTruncated
		out.FilesTruncated = o.FilesTruncated
		for _, f := range o.Files {
			out.Files = append(out.Files, mcpFile{Path: f.Path, Size: f.Size})
		}
		for _, f := range o.FilesOmitted {
			out.FilesOmitted = append(out.FilesOmitted, mcpFile{Path: f.Path, Size: f.Size})
		}
	}
	structured, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("encoding the tool's structured content: %w", err)
	}
	res := &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: summary(out, o != nil && o.Started)}},
		StructuredContent: json.RawMessage(structured)}
	if o != nil {
		for _, f := range o.Files {
			data, err := base64.StdEncoding.DecodeString(f.Content)
			if err != nil { // the sandbox checked every file's base64; a file that is not is left out, not sent wrong
				continue
			}
			res.Content = append(res.Content, fileContent(f.Path, data))
		}
	}
	return res, nil
}

// mcpIndentMax bounds the indented result in the text for the model.
const mcpIndentMax = 16 << 10

// capText cuts s at mcpTextCap bytes (at a character's start), saying where the whole of it is.
func capText(s, what, field string) string {
	if len(s) <= mcpTextCap {
		return s
	}
	cut := mcpTextCap
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s\n(%s is cut here at %d of its %d bytes; the structured content's %s has all of it)",
		s[:cut], what, cut, len(s), field)
}

// imageTypes are the images a model can see: sniffed from the bytes, since a script may name a file as it likes.
var imageTypes = map[string]bool{"image/png": true, "image/jpeg": true, "image/gif": true, "image/webp": true}

func fileContent(p string, data []byte) mcp.Content {
	sniffed := http.DetectContentType(data)
	if imageTypes[sniffed] {
		return &mcp.ImageContent{Data: data, MIMEType: sniffed, Meta: mcp.Meta{"path": p}}
	}
	mt := mime.TypeByExtension(path.Ext(p))
	if mt == "" {
		mt = sniffed
	}
	u := url.URL{Scheme: "file", Path: "/sandbox/" + p}
	return &mcp.EmbeddedResource{Resource: &mcp.ResourceContents{URI: u.String(), MIMEType: mt, Blob: data}}
}

// summary is the text a model reads: the error or the result, then stdout, stderr and the files, each labelled.
func summary(out *runOutput, started bool) string {
	var b strings.Builder
	if e := out.Error; e != nil {
		fmt.Fprintf(&b, "%s: %s\n", e.Type, e.Message)
		if e.Limit != "" {
			fmt.Fprintf(&b, "limit: %s\n", e.Limit)
		}
		if e.Traceback != "" {
			fmt.Fprintf(&b, "\ntraceback:\n%s\n", strings.TrimRight(e.Traceback, "\n"))
		}
	} else {
		result := out.Result
		var r bytes.Buffer
		// Indented only when short: json.Indent writes a deeply nested result hundreds of times over.
		if len(result) <= mcpIndentMax/16 && json.Indent(&r, result, "", "  ") == nil && r.Len() <= mcpIndentMax {
			result = r.Bytes()
		}
		fmt.Fprintf(&b, "result (JSON):\n%s\n", capText(string(result), "the result", "result"))
	}
	if !started {
		return b.String()
	}
	section := func(name, text string, truncated bool) {
		if text == "" {
			fmt.Fprintf(&b, "\n%s: (empty)\n", name)
			return
		}
		fmt.Fprintf(&b, "\n%s:\n%s\n", name, strings.TrimSuffix(capText(text, name, name), "\n"))
		if truncated {
			fmt.Fprintf(&b, "(%s was cut at its cap)\n", name)
		}
	}
	section("stdout", out.Stdout, out.StdoutTruncated)
	section("stderr", out.Stderr, out.StderrTruncated)
	if len(out.Files) > 0 {
		b.WriteString("\nfiles left in /sandbox (attached):\n")
		for _, f := range out.Files {
			fmt.Fprintf(&b, "- %s (%s bytes)\n", f.Path, strconv.FormatInt(f.Size, 10))
		}
	}
	if out.FilesTruncated {
		b.WriteString("\nfiles not returned (over the caps):\n")
		for _, f := range out.FilesOmitted {
			fmt.Fprintf(&b, "- %s (%d bytes)\n", f.Path, f.Size)
		}
	}
	return b.String()
}
