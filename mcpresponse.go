package safepy

// What /mcp answers: the tool's result in the shapes a model reads, what encoding it holds, and its paced writing.

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/safe-py/safepy/internal/pace"
	"github.com/safe-py/safepy/sandbox"
)

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
