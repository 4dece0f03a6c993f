package safepy

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/safe-py/safepy/internal/budget"
	"github.com/safe-py/safepy/internal/pace"
	"github.com/safe-py/safepy/sandbox"
)

// maxDiscard bounds what the server reads and throws away of a body over its cap, so that a client that writes
// its whole body before it reads (many do) sees the 413 instead of a broken pipe. Past it, the connection is
// closed without reading on: the bound keeps a client from making the server read forever.
const maxDiscard = 16 << 20

// executeRequest is a decoded, validated body of POST /execute.
type executeRequest struct {
	Script []byte
	Files  []sandbox.File
}

// bodyRate is the least rate at which a client must send its body, after a grace for the first bytes (as for a
// header): a client that trickles its body is cut off instead of holding its connection and what it sent.
var bodyRate = pace.Rate{Grace: 5 * time.Second, BytesPerSec: 64 << 10}

// decodeCost is what checking and decoding a body may take besides the body itself, in multiples of its size.
const decodeCost = 3

// errBodyBudget is what reading a body returns when the service's budget has no room for its next bytes.
var errBodyBudget = errors.New("the server is reading too many request bodies at once; retry later")

// bodyReader reads a request's body, charging every byte to the request's hold on the service's budget as it
// arrives (not as announced) and keeping the client to bodyRate.
type bodyReader struct {
	r    io.Reader
	held *budget.Hold
}

func (b *bodyReader) Read(p []byte) (int, error) {
	if len(p) > 64<<10 {
		p = p[:64<<10]
	}
	if !b.held.TryGrow(int64(len(p))) {
		return 0, errBodyBudget
	}
	n, err := b.r.Read(p)
	b.held.Shrink(int64(len(p) - n))
	return n, err
}

// decodeRequest reads a request body strictly (decodeBody). What the body holds is charged to held as it arrives;
// when the budget has no room, the status is 503.
func decodeRequest(w http.ResponseWriter, r *http.Request, held *budget.Hold, maxBody int64, maxScript, maxInodes int) (executeRequest, int, *apiError) {
	body, status, aerr := readBody(w, r, held, maxBody)
	if aerr != nil {
		return executeRequest{}, status, aerr
	}
	// Checking and decoding the body takes a few times its size for a moment (its tokens, the fields' raw text, the
	// decoded strings): that is held too, and what the request keeps (its script and files) is what it holds after.
	if !held.TryGrow(decodeCost * int64(len(body))) {
		return executeRequest{}, http.StatusServiceUnavailable, &apiError{Type: "Overloaded", Message: errBodyBudget.Error()}
	}
	req, status, aerr := decodeBody(body, maxScript, maxInodes)
	if aerr != nil {
		return req, status, aerr
	}
	held.Shrink(held.Bytes() - req.size())
	return req, 0, nil
}

// decodeBody reads the contract's request (POST /execute's body, the MCP tool's arguments) strictly: valid UTF-8,
// one JSON object with no duplicate keys and no lone surrogate escapes (which a decoder would silently replace),
// with a non-empty string "script" and optionally "files". The script that runs, and the files it finds, are
// exactly the ones that were sent, or nothing runs.
func decodeBody(body []byte, maxScript, maxInodes int) (executeRequest, int, *apiError) {
	invalid := func(status int, format string, args ...any) (executeRequest, int, *apiError) {
		return executeRequest{}, status, &apiError{Type: "ValidationError", Message: fmt.Sprintf(format, args...)}
	}
	if !utf8.Valid(body) {
		return invalid(http.StatusBadRequest, "request body is not valid UTF-8 (at byte %d)", invalidUTF8At(body))
	}
	if start := bytes.TrimLeft(body, " \t\r\n"); len(start) == 0 || start[0] != '{' {
		return invalid(http.StatusBadRequest, "request body must be a JSON object")
	}
	if err := checkJSON(body); err != nil {
		return invalid(http.StatusBadRequest, "%s", err.Error())
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil || fields == nil {
		return invalid(http.StatusBadRequest, "request body must be a JSON object")
	}
	for name := range fields {
		if name != "script" && name != "files" {
			return invalid(http.StatusBadRequest, "unknown field %q; the fields are 'script' and 'files'", name)
		}
	}
	raw, ok := fields["script"]
	if !ok {
		return invalid(http.StatusBadRequest, "missing 'script' field")
	}
	var script string
	if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &script) != nil {
		return invalid(http.StatusBadRequest, "'script' must be a string")
	}
	return checkRequest(script, fields["files"], maxScript, maxInodes)
}

// readBody reads a request's whole body, at most maxBody bytes, charging it to held as it arrives and keeping the
// client to bodyRate. A body over the cap is 413 (with a bounded excess read first, see maxDiscard); no room in
// the budget is 503.
func readBody(w http.ResponseWriter, r *http.Request, held *budget.Hold, maxBody int64) ([]byte, int, *apiError) {
	invalid := func(status int, format string, args ...any) ([]byte, int, *apiError) {
		return nil, status, &apiError{Type: "ValidationError", Message: fmt.Sprintf(format, args...)}
	}
	tooLarge := func() ([]byte, int, *apiError) {
		w.Header().Set("Connection", "close")
		return invalid(http.StatusRequestEntityTooLarge, "request body is over the limit of %d bytes", maxBody)
	}
	if r.ContentLength > maxBody {
		// A client that asked before sending gets its answer without sending; one that sends anyway is read
		// (within a bound) so that it can read the answer.
		if r.Header.Get("Expect") != "100-continue" && r.ContentLength <= maxBody+maxDiscard {
			discard(w, r.Body, r.ContentLength)
		}
		return tooLarge()
	}
	rc := http.NewResponseController(w)
	setDeadline := func(t time.Time) error { return unsupportedOK(rc.SetReadDeadline(t)) }
	paced := &pace.Reader{R: r.Body, Rate: bodyRate, Start: time.Now(), SetDeadline: setDeadline}
	body, err := io.ReadAll(io.LimitReader(&bodyReader{r: paced, held: held}, maxBody+1))
	// No deadline once the body is in: the server's read of the connection that notices a client that goes away
	// would take one that passes for that, and cancel the request.
	_ = setDeadline(time.Time{})
	switch {
	case errors.Is(err, errBodyBudget):
		return nil, http.StatusServiceUnavailable, &apiError{Type: "Overloaded", Message: errBodyBudget.Error()}
	case errors.Is(err, os.ErrDeadlineExceeded):
		w.Header().Set("Connection", "close")
		return invalid(http.StatusBadRequest, "the request body arrived slower than %d bytes a second", bodyRate.BytesPerSec)
	case err != nil:
		return invalid(http.StatusBadRequest, "could not read the request body")
	}
	if int64(len(body)) > maxBody {
		discard(w, r.Body, maxDiscard)
		return tooLarge()
	}
	return body, 0, nil
}

// checkRequest makes a request of a decoded script and the raw JSON of its files (nil when there are none): the
// checks every way in (POST /execute, the MCP tool) shares, so a request is accepted or refused alike on each.
func checkRequest(script string, rawFiles json.RawMessage, maxScript, maxInodes int) (executeRequest, int, *apiError) {
	invalid := func(status int, format string, args ...any) (executeRequest, int, *apiError) {
		return executeRequest{}, status, &apiError{Type: "ValidationError", Message: fmt.Sprintf(format, args...)}
	}
	if script == "" {
		return invalid(http.StatusBadRequest, "'script' must not be empty")
	}
	if len(script) > maxScript {
		return invalid(http.StatusRequestEntityTooLarge, "'script' is over the limit of %d bytes of UTF-8", maxScript)
	}
	var files []sandbox.File
	if rawFiles != nil {
		var msg string
		if files, msg = decodeFiles(rawFiles, maxInodes); msg != "" {
			return invalid(http.StatusBadRequest, "%s", msg)
		}
	}
	return executeRequest{Script: []byte(script), Files: files}, 0, nil
}

// size is what the request holds in memory: its script and files.
func (req *executeRequest) size() int64 {
	n := int64(len(req.Script))
	for _, f := range req.Files {
		n += int64(len(f.Path) + len(f.Data))
	}
	return n
}

// decodeFiles reads the request's files: an array of at most sandbox.MaxFiles objects, each exactly a relative
// "path" and a "content" in standard base64. What is wrong is said of the entry, by index and path.
func decodeFiles(raw json.RawMessage, maxInodes int) ([]sandbox.File, string) {
	notArray := "'files' must be an array of {\"path\", \"content\"} objects"
	if len(raw) == 0 || raw[0] != '[' {
		return nil, notArray
	}
	// Entry by entry, and no further than one past the cap: an array of a million empty objects is refused
	// without a million of anything.
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.Token() // [
	var entries []json.RawMessage
	for dec.More() {
		if len(entries) == sandbox.MaxFiles {
			return nil, fmt.Sprintf("'files' has more than %d entries", sandbox.MaxFiles)
		}
		var e json.RawMessage
		if dec.Decode(&e) != nil {
			return nil, notArray
		}
		entries = append(entries, e)
	}
	files := make([]sandbox.File, len(entries))
	for i, e := range entries {
		var fields map[string]json.RawMessage
		if len(e) == 0 || e[0] != '{' || json.Unmarshal(e, &fields) != nil {
			return nil, fmt.Sprintf("files[%d] must be an object with 'path' and 'content'", i)
		}
		var path, content string
		rawPath, ok := fields["path"]
		if !ok {
			return nil, fmt.Sprintf("files[%d] has no 'path'", i)
		}
		if len(rawPath) == 0 || rawPath[0] != '"' || json.Unmarshal(rawPath, &path) != nil {
			return nil, fmt.Sprintf("files[%d]: 'path' must be a string", i)
		}
		name := fmt.Sprintf("files[%d] (%s)", i, strconv.Quote(clip(path, 100)))
		for k := range fields {
			if k != "path" && k != "content" {
				return nil, fmt.Sprintf("%s has an unknown field %q; the fields are 'path' and 'content'", name, k)
			}
		}
		rawContent, ok := fields["content"]
		if !ok {
			return nil, fmt.Sprintf("%s has no 'content'", name)
		}
		if len(rawContent) == 0 || rawContent[0] != '"' || json.Unmarshal(rawContent, &content) != nil {
			return nil, fmt.Sprintf("%s: 'content' must be a string of base64", name)
		}
		// Strict: padding, no line breaks (which Go's decoder would skip), no bits beyond the last byte.
		data, err := base64.StdEncoding.Strict().DecodeString(content)
		if err != nil || strings.ContainsAny(content, "\r\n") {
			return nil, fmt.Sprintf("%s: 'content' is not valid base64 (standard alphabet, with padding)", name)
		}
		files[i] = sandbox.File{Path: path, Data: data}
	}
	if i, err := sandbox.CheckFiles(files, maxInodes); err != nil {
		return nil, fmt.Sprintf("files[%d] (%s): %s", i, strconv.Quote(clip(files[i].Path, 100)), err.Error())
	}
	return files, ""
}

// discard reads and drops up to n bytes of body, for at most a few seconds.
func discard(w http.ResponseWriter, body io.Reader, n int64) {
	_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.CopyN(io.Discard, body, n)
}

func invalidUTF8At(b []byte) int {
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && size == 1 {
			return i
		}
		i += size
	}
	return -1
}

// maxDepth bounds the nesting of a request body. The contract's deepest is 3 (the body, files, an entry); a body of
// nothing but brackets would otherwise cost the decoder's stacks many times its size in memory, before any queue.
const maxDepth = 32

// maxKeys bounds the keys of an object in a request body, and maxElements the elements of an array. The contract's
// objects have two keys at most, its one array 64 elements (decodeFiles says so when there are more); a body of
// nothing but distinct keys, or of empty objects in an array, would otherwise cost the checks and the decoder many
// times its size in memory.
const (
	maxKeys     = 16
	maxElements = 1024
)

// checkJSON accepts exactly one JSON object whose objects, at every depth, have no duplicate keys and at most
// maxKeys keys, whose arrays have at most maxElements elements, and whose strings escape no lone surrogate. Errors
// are written for the client.
func checkJSON(body []byte) error {
	if err := checkSurrogates(body); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	type frame struct {
		object   bool
		keys     map[string]bool
		wantKey  bool
		elements int
	}
	var stack []frame
	first := true
	for {
		tok, err := dec.Token()
		if err == io.EOF && len(stack) > 0 {
			return errors.New("request body is not valid JSON: it ends before the object does")
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			var syntax *json.SyntaxError
			if errors.As(err, &syntax) {
				return fmt.Errorf("request body is not valid JSON: %s (at byte %d)", syntax.Error(), syntax.Offset)
			}
			return fmt.Errorf("request body is not valid JSON: %s", err.Error())
		}
		if first {
			if d, ok := tok.(json.Delim); !ok || d != '{' {
				return errors.New("request body must be a JSON object")
			}
			first = false
		} else if len(stack) == 0 {
			return errors.New("request body must be a single JSON object")
		}
		top := (*frame)(nil)
		if len(stack) > 0 {
			top = &stack[len(stack)-1]
		}
		if top != nil && top.object && top.wantKey {
			if d, ok := tok.(json.Delim); ok && d == '}' {
				stack = stack[:len(stack)-1]
				continue
			}
			key := tok.(string)
			if top.keys[key] {
				return fmt.Errorf("request body has a duplicate key %s", strconv.Quote(clip(key, 100)))
			}
			if len(top.keys) == maxKeys {
				return fmt.Errorf("request body has an object with more than %d keys", maxKeys)
			}
			if top.keys == nil { // made on an object's first key: an empty object costs no map
				top.keys = map[string]bool{}
			}
			top.keys[key] = true
			top.wantKey = false
			continue
		}
		if top != nil && top.object {
			top.wantKey = true // this token is the value (or opens it)
		}
		if top != nil && !top.object && tok != json.Delim(']') {
			if top.elements++; top.elements > maxElements {
				return fmt.Errorf("request body has an array with more than %d elements", maxElements)
			}
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			if len(stack) >= maxDepth {
				return fmt.Errorf("request body is nested deeper than %d levels", maxDepth)
			}
			stack = append(stack, frame{object: tok == json.Delim('{'), wantKey: tok == json.Delim('{')})
		case json.Delim(']'):
			stack = stack[:len(stack)-1]
		}
	}
	if first {
		return errors.New("request body must be a JSON object")
	}
	return nil
}

// checkSurrogates finds \uXXXX escapes of UTF-16 surrogates that do not form a pair: they name no character, and
// a decoder would replace them with U+FFFD, running a script other than the one sent.
func checkSurrogates(body []byte) error {
	inString := false
	pendingHigh := false // the last escape was a high surrogate, which must be followed by a low one
	for i := 0; i < len(body); i++ {
		c := body[i]
		if !inString {
			if c == '"' {
				inString = true
			}
			continue
		}
		if c == '"' {
			if pendingHigh {
				return surrogateError(i)
			}
			inString = false
			continue
		}
		if c != '\\' || i+1 >= len(body) {
			if pendingHigh {
				return surrogateError(i)
			}
			continue
		}
		i++
		if body[i] != 'u' || i+4 >= len(body) {
			if pendingHigh {
				return surrogateError(i)
			}
			continue
		}
		v, err := strconv.ParseUint(string(body[i+1:i+5]), 16, 16)
		if err != nil {
			continue // not valid JSON; the decoder says so
		}
		i += 4
		switch {
		case v >= 0xD800 && v < 0xDC00:
			if pendingHigh {
				return surrogateError(i)
			}
			pendingHigh = true
		case v >= 0xDC00 && v < 0xE000:
			if !pendingHigh {
				return surrogateError(i)
			}
			pendingHigh = false
		default:
			if pendingHigh {
				return surrogateError(i)
			}
		}
	}
	return nil
}

func surrogateError(at int) error {
	return fmt.Errorf("request body is not valid Unicode: an unpaired surrogate escape near byte %d", at)
}

// clip cuts a client's string to n bytes (whole characters) for a message or a log line.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "..."
}
