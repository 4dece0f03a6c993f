package safepy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/safe-py/safepy/internal/pace"
	"github.com/safe-py/safepy/sandbox"
)

// An execution's answer can be large (stdout, stderr, the result and the files: some 15 MiB at the default caps,
// more in JSON, where a control character takes six bytes). It is never built in a buffer: it is encoded straight
// to the connection, piece by piece, at no less than answerRate, and the memory it holds until then is counted in
// the service's budget (see Service.execute). A client that stops reading is cut off.

// answerRate is the least rate at which a client must read its answer, after a grace for the first bytes: a
// stalled client holds its answer's memory and its connection for a few seconds, not for the server's write
// timeout. (Cloud Run's front end reads at once; a slow link still gets 15 MiB in about a minute.)
var answerRate = pace.Rate{Grace: 5 * time.Second, BytesPerSec: 256 << 10}

// The answers' shapes. stderr and files are there only when the script wrote to stderr or left files: a request
// that did neither gets the answer it got before they existed, byte for byte. An execution's answer is streamed
// (answer.encode) in exactly the encoding encoding/json gives these types (TestAnswerEncodingIsEncodingJSONs).
type successResponse struct {
	Result          json.RawMessage       `json:"result"`
	Stdout          string                `json:"stdout"`
	StdoutTruncated bool                  `json:"stdout_truncated,omitempty"`
	Stderr          string                `json:"stderr,omitempty"`
	StderrTruncated bool                  `json:"stderr_truncated,omitempty"`
	Files           []sandbox.OutputFile  `json:"files,omitempty"`
	FilesTruncated  bool                  `json:"files_truncated,omitempty"`
	FilesOmitted    []sandbox.OmittedFile `json:"files_omitted,omitempty"`
}

type apiError struct {
	Type      string `json:"type"`
	Message   string `json:"message"`
	Traceback string `json:"traceback,omitempty"`
	Limit     string `json:"limit,omitempty"`
}

type errorResponse struct {
	Error           apiError              `json:"error"`
	Stdout          *string               `json:"stdout,omitempty"`
	StdoutTruncated bool                  `json:"stdout_truncated,omitempty"`
	Stderr          string                `json:"stderr,omitempty"`
	StderrTruncated bool                  `json:"stderr_truncated,omitempty"`
	Files           []sandbox.OutputFile  `json:"files,omitempty"`
	FilesTruncated  bool                  `json:"files_truncated,omitempty"`
	FilesOmitted    []sandbox.OmittedFile `json:"files_omitted,omitempty"`
}

// answer is an execution's answer: a success (err nil) or an error, with what the script left when it started
// (out nil when it did not).
type answer struct {
	status int
	err    *apiError
	out    *sandbox.Outcome
}

// size is what the answer holds in memory until it is written: the outcome's text and files, and a compacted copy
// of the result made while it is encoded.
func (a *answer) size() int64 {
	n := int64(4 << 10)
	if a.err != nil {
		n += int64(len(a.err.Message) + len(a.err.Traceback))
	}
	if o := a.out; o != nil {
		n += int64(2*len(o.Result) + len(o.Stdout) + len(o.Stderr))
		for _, f := range o.Files {
			n += int64(len(f.Path)+len(f.Content)) + 64
		}
		for _, f := range o.FilesOmitted {
			n += int64(len(f.Path)) + 64
		}
	}
	return n
}

// encode writes the answer's JSON to w, exactly as encoding/json's Encoder (HTML left unescaped) writes
// successResponse or errorResponse, with its newline.
func (a *answer) encode(w io.Writer) error {
	e := &streamEncoder{w: w}
	o := a.out
	if a.err == nil {
		e.raw(`{"result":`)
		e.compact(o.Result)
		e.raw(`,"stdout":`)
		e.str(o.Stdout)
	} else {
		e.raw(`{"error":`)
		e.value(a.err)
		if o != nil && o.Started {
			e.raw(`,"stdout":`)
			e.str(o.Stdout)
		}
	}
	if o != nil && (a.err == nil || o.Started) {
		if o.StdoutTruncated {
			e.raw(`,"stdout_truncated":true`)
		}
		if o.Stderr != "" {
			e.raw(`,"stderr":`)
			e.str(o.Stderr)
		}
		if o.StderrTruncated {
			e.raw(`,"stderr_truncated":true`)
		}
		for i, f := range o.Files {
			if i == 0 {
				e.raw(`,"files":[`)
			} else {
				e.raw(`,`)
			}
			e.raw(`{"path":`)
			e.str(f.Path)
			e.raw(`,"size":` + strconv.FormatInt(f.Size, 10) + `,"content":`)
			e.str(f.Content)
			e.raw(`}`)
			if i == len(o.Files)-1 {
				e.raw(`]`)
			}
		}
		if o.FilesTruncated {
			e.raw(`,"files_truncated":true`)
		}
		if len(o.FilesOmitted) > 0 {
			e.raw(`,"files_omitted":`)
			e.value(o.FilesOmitted)
		}
	}
	e.raw("}\n")
	return e.err
}

// streamEncoder writes JSON piece by piece; its first error sticks.
type streamEncoder struct {
	w   io.Writer
	err error
	tmp bytes.Buffer
}

func (e *streamEncoder) raw(s string) {
	if e.err == nil {
		_, e.err = io.WriteString(e.w, s)
	}
}

// value writes a small value as encoding/json does.
func (e *streamEncoder) value(v any) {
	if e.err != nil {
		return
	}
	e.tmp.Reset()
	enc := json.NewEncoder(&e.tmp)
	enc.SetEscapeHTML(false)
	if e.err = enc.Encode(v); e.err == nil {
		_, e.err = e.w.Write(bytes.TrimSuffix(e.tmp.Bytes(), []byte("\n")))
	}
}

// strPiece is how much of a string is escaped at once: the escaping's own memory stays small whatever the string.
const strPiece = 32 << 10

// str writes a string as encoding/json does, escaping it a piece at a time (cut at rune boundaries, so each piece
// escapes as it would within the whole).
func (e *streamEncoder) str(s string) {
	e.raw(`"`)
	for len(s) > 0 && e.err == nil {
		n := min(len(s), strPiece)
		for n < len(s) && !utf8.RuneStart(s[n]) {
			n--
		}
		e.tmp.Reset()
		enc := json.NewEncoder(&e.tmp)
		enc.SetEscapeHTML(false)
		if e.err = enc.Encode(s[:n]); e.err == nil {
			b := e.tmp.Bytes()
			_, e.err = e.w.Write(b[1 : len(b)-2]) // less the quotes and the newline
		}
		s = s[n:]
	}
	e.raw(`"`)
}

// compact writes JSON text without its insignificant space, as encoding/json writes a json.RawMessage.
func (e *streamEncoder) compact(raw json.RawMessage) {
	if e.err != nil {
		return
	}
	e.tmp.Reset()
	if e.err = json.Compact(&e.tmp, raw); e.err == nil {
		_, e.err = e.w.Write(e.tmp.Bytes())
	}
}

// counter counts what is written to it.
type counter struct{ n int64 }

func (c *counter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

// errNotSent wraps the failure to send an answer: the client did not read it in time, or went away.
var errNotSent = errors.New("the answer was not sent")

// send streams the answer to the client with its Content-Length, keeping to answerRate. It returns how many bytes
// of the body went out and, if not all did, why.
func send(w http.ResponseWriter, a *answer) (int64, error) {
	var length counter
	if err := a.encode(&length); err != nil {
		// The outcome was checked when it was made; an answer that cannot be encoded is the server's fault.
		writeError(w, http.StatusInternalServerError, apiError{Type: "InternalError", Message: "could not encode the response"}, nil)
		return 0, err
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Length", strconv.FormatInt(length.n, 10))
	w.WriteHeader(a.status)
	rc := http.NewResponseController(w)
	setDeadline := func(t time.Time) error { return unsupportedOK(rc.SetWriteDeadline(t)) }
	pw := &pace.Writer{W: w, Rate: answerRate, Start: time.Now(), SetDeadline: setDeadline}
	bw := bufio.NewWriterSize(pw, strPiece)
	err := a.encode(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		// Out of the server's own buffers, within the pace's deadline; the connection's next request starts
		// with no deadline of this one's.
		if err = pw.Flush(func() error { return unsupportedOK(rc.Flush()) }); err == nil {
			err = setDeadline(time.Time{})
		}
	}
	if err != nil {
		return pw.Written(), errors.Join(errNotSent, err)
	}
	return pw.Written(), nil
}

// unsupportedOK lets a writer without deadlines or flushing (a test's recorder) go unpaced.
func unsupportedOK(err error) error {
	if errors.Is(err, http.ErrNotSupported) {
		return nil
	}
	return err
}

// writeError answers with the contract's error shape; stdout is included whenever the script started, stderr and
// files whenever it left any. For small answers only: an execution's goes through send.
func writeError(w http.ResponseWriter, status int, e apiError, out *sandbox.Outcome) {
	resp := errorResponse{Error: e}
	if out != nil && out.Started {
		resp.Stdout, resp.StdoutTruncated = &out.Stdout, out.StdoutTruncated
		resp.Stderr, resp.StderrTruncated, resp.Files = out.Stderr, out.StderrTruncated, out.Files
		resp.FilesTruncated, resp.FilesOmitted = out.FilesTruncated, out.FilesOmitted
	}
	writeJSON(w, status, resp)
}

func methodNotAllowed(w http.ResponseWriter, allow string) {
	w.Header().Set("Allow", allow)
	writeError(w, http.StatusMethodNotAllowed, apiError{Type: "MethodNotAllowed",
		Message: "method not allowed; allowed: " + allow}, nil)
}

// writeJSON writes a small answer whole.
func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		status = http.StatusInternalServerError
		buf.Reset()
		buf.WriteString(`{"error":{"type":"InternalError","message":"could not encode the response"}}` + "\n")
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}
