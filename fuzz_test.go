package safepy

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"unicode/utf8"

	"github.com/safe-py/safepy/internal/budget"
	"github.com/safe-py/safepy/sandbox"
)

// FuzzDecodeRequest: whatever the body, decoding either yields a script the contract allows (exactly the string
// the body holds, from a body that is valid UTF-8 and one object without duplicate keys), or a ValidationError
// with 400 or 413, and never panics.
func FuzzDecodeRequest(f *testing.F) {
	for _, seed := range []string{`{"script":"def main(): pass"}`, `{}`, `[]`, `{"script":1}`, `{"script":""}`,
		`{"script":"x","a":1}`, `{"script":"\ud800"}`, `{"script":"x"} x`, "\xff", `{"script":"x"}` + "\n",
		`{"script":"x","script":"y"}`, `{"script":"\ud83d\ude00"}`, `{"script":"\\ud800"}`,
		`{"script":"x","files":[{"path":"a/b","content":"aGk="}]}`, `{"script":"x","files":[{"path":"../a","content":""}]}`,
		`{"script":"x","files":[{"path":"a","content":"!"}]}`, `{"script":"x","files":{}}`} {
		f.Add([]byte(seed))
	}
	const maxBody, maxScript = 256, 64
	f.Fuzz(func(t *testing.T, body []byte) {
		r := httptest.NewRequest(http.MethodPost, "/execute", bytes.NewReader(body))
		w := httptest.NewRecorder()
		req, status, verr := decodeRequest(w, r, budget.New(1<<20, 0, 0).NewHold(), maxBody, maxScript, 4096)
		script := req.Script
		if verr != nil {
			if verr.Type != "ValidationError" || (status != 400 && status != 413) || verr.Message == "" {
				t.Fatalf("error %d %+v", status, verr)
			}
			if status == 413 && len(body) <= maxBody {
				var v struct{ Script string }
				if json.Unmarshal(body, &v) != nil || len(v.Script) <= maxScript {
					t.Fatalf("413 for a body and script within their caps: %q", body)
				}
			}
			return
		}
		if len(body) > maxBody || len(script) == 0 || len(script) > maxScript || !utf8.Valid(script) || !utf8.Valid(body) {
			t.Fatalf("accepted %q from %q", script, body)
		}
		if err := checkJSON(body); err != nil {
			t.Fatalf("accepted a body the strict check refuses (%v): %q", err, body)
		}
		var fields map[string]json.RawMessage
		if err := json.Unmarshal(body, &fields); err != nil || len(fields) != 1+len(fields["files"][:min(len(fields["files"]), 1)]) {
			t.Fatalf("accepted a body that is not an object of 'script' and perhaps 'files': %q", body)
		}
		if _, err := sandbox.CheckFiles(req.Files, 4096); err != nil {
			t.Fatalf("accepted files the sandbox refuses (%v): %q", err, body)
		}
		var s string
		if err := json.Unmarshal(fields["script"], &s); err != nil || s != string(script) {
			t.Fatalf("script %q, body says %q", script, s)
		}
	})
}
