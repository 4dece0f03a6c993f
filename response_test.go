package safepy

import (
	"bytes"
	"encoding/json"
	"math/rand"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/safe-py/safepy/sandbox"
)

// The streamed answer is byte for byte what encoding/json writes for the answer's shapes: every field, every
// omission, every escape, strings cut into pieces anywhere (a rune across a piece's end, escapes at its edges).
func TestAnswerEncodingIsEncodingJSONs(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	alphabet := []string{"a", "\"", "\\", "\n", "\t", "\x01", "\x1f", "\b", "\f", "<", ">", "&", "\u2028", "\u2029", "é", "€", "😀", "\ufffd", " "}
	text := func(n int) string {
		var b strings.Builder
		for b.Len() < n {
			b.WriteString(alphabet[rng.Intn(len(alphabet))])
		}
		return b.String()
	}
	sizes := []int{0, 1, 7, strPiece - 1, strPiece, strPiece + 1, 3*strPiece + 5}
	for i := 0; i < 200; i++ {
		out := &sandbox.Outcome{Started: rng.Intn(4) != 0, Result: json.RawMessage(`{ "a" : [1, 2.50, 1e400, "x\u00e9"], "b": null }`),
			Stdout: text(sizes[rng.Intn(len(sizes))]), StdoutTruncated: rng.Intn(2) == 0, Stderr: text(sizes[rng.Intn(3)]),
			StderrTruncated: rng.Intn(3) == 0, FilesTruncated: rng.Intn(2) == 0}
		for j := rng.Intn(3); j > 0; j-- {
			out.Files = append(out.Files, sandbox.OutputFile{Path: "d/" + text(5), Size: int64(rng.Intn(1000)), Content: "aGk=" + strconv.Itoa(j)})
		}
		for j := rng.Intn(3); j > 0; j-- {
			out.FilesOmitted = append(out.FilesOmitted, sandbox.OmittedFile{Path: text(3), Size: int64(rng.Intn(1 << 30))})
		}
		var a answer
		var want any
		switch i % 3 {
		case 0:
			a = answer{status: 200, out: out}
			want = successResponse{Result: out.Result, Stdout: out.Stdout, StdoutTruncated: out.StdoutTruncated, Stderr: out.Stderr,
				StderrTruncated: out.StderrTruncated, Files: out.Files, FilesTruncated: out.FilesTruncated, FilesOmitted: out.FilesOmitted}
		case 1:
			e := apiError{Type: "ExecutionError", Message: text(40), Traceback: text(rng.Intn(2) * 100), Limit: []string{"", "memory"}[rng.Intn(2)]}
			a = answer{status: 422, out: out, err: &e}
			resp := errorResponse{Error: e}
			if out.Started {
				resp.Stdout, resp.StdoutTruncated, resp.Stderr, resp.StderrTruncated = &out.Stdout, out.StdoutTruncated, out.Stderr, out.StderrTruncated
				resp.Files, resp.FilesTruncated, resp.FilesOmitted = out.Files, out.FilesTruncated, out.FilesOmitted
			}
			want = resp
		default:
			e := apiError{Type: "InternalError", Message: "the sandbox failed"}
			a = answer{status: 500, err: &e}
			want = errorResponse{Error: e}
		}
		var wantBuf bytes.Buffer
		enc := json.NewEncoder(&wantBuf)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(want); err != nil {
			t.Fatal(err)
		}
		var got bytes.Buffer
		if err := a.encode(&got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), wantBuf.Bytes()) {
			t.Fatalf("case %d:\n got  %.300q\n want %.300q", i, got.Bytes(), wantBuf.Bytes())
		}
		// And as sent: with its exact length.
		w := httptest.NewRecorder()
		if _, err := send(w, &a); err != nil || !bytes.Equal(w.Body.Bytes(), wantBuf.Bytes()) ||
			w.Header().Get("Content-Length") != strconv.Itoa(wantBuf.Len()) || w.Code != a.status {
			t.Fatalf("case %d sent: %v, %d, length %s", i, err, w.Code, w.Header().Get("Content-Length"))
		}
	}
}
