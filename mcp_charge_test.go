package safepy

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"github.com/safe-py/safepy/sandbox"
)

// What an MCP answer is charged covers what encoding it holds: the outcome, and the SDK's encoding of the whole
// response twice over, with every string at its length in JSON. (Charged at four times /execute's size, 1 MiB of
// \x01 on stdout and on stderr was a 25 MB response charged 8 MB.) The text for the model shows at most mcpTextCap
// of each part, saying so; the structured content has everything.
func TestMCPAnswerChargeCoversItsEncoding(t *testing.T) {
	mib := 1 << 20
	nested := strings.Repeat("[", 900) + strings.Repeat("]", 900)
	file := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("\x00\x01", 64<<10)))
	tests := []struct {
		name string
		out  sandbox.Outcome
		cut  bool // the text for the model is cut
	}{
		{"small", sandbox.Outcome{Started: true, Result: json.RawMessage(`{"ok": true}`), Stdout: "hello\n"}, false},
		{"control bytes", sandbox.Outcome{Started: true, Result: json.RawMessage(`1`),
			Stdout: strings.Repeat("\x01", mib), Stderr: strings.Repeat("\x01", mib)}, true},
		{"HTML and quotes", sandbox.Outcome{Started: true, Result: json.RawMessage(`"` + strings.Repeat(`\"`, mib/2) + `"`),
			Stdout: strings.Repeat("<&>", mib/3)}, true},
		{"a deeply nested result", sandbox.Outcome{Started: true, Result: json.RawMessage(nested)}, false},
		{"many nested results", sandbox.Outcome{Started: true, Result: json.RawMessage("[" + strings.Repeat(nested+",", 500) + "1]")}, true},
		{"files", sandbox.Outcome{Started: true, Result: json.RawMessage(`1`), Files: func() []sandbox.OutputFile {
			var fs []sandbox.OutputFile
			for i := range 64 {
				fs = append(fs, sandbox.OutputFile{Path: strings.Repeat("<", 200) + string(rune('a'+i%26)), Content: file, Size: 128 << 10})
			}
			return fs
		}()}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := &answer{status: 200, out: &tt.out}
			res, err := toolResult(a.out, nil)
			if err != nil {
				t.Fatal(err)
			}
			response, err := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": 1, "result": res})
			if err != nil {
				t.Fatal(err)
			}
			text := textOf(res)
			held := a.size() + int64(len(text)) + int64(len(res.StructuredContent.(json.RawMessage)))
			if charge := mcpAnswerBytes(a); charge < held+2*int64(len(response)) {
				t.Fatalf("charged %d bytes for an outcome, text and structured content of %d and a %d-byte response",
					charge, held, len(response))
			}
			if cut := strings.Contains(text, "is cut here at"); cut != tt.cut || len(text) > 4*mcpTextCap {
				t.Fatalf("text of %d bytes, cut %v, want cut %v", len(text), cut, tt.cut)
			}
			var out runOutput
			var result bytes.Buffer // encoding/json compacts a RawMessage: the same JSON text, less its spaces
			json.Compact(&result, tt.out.Result)
			if err := json.Unmarshal(res.StructuredContent.(json.RawMessage), &out); err != nil ||
				out.Stdout != tt.out.Stdout || out.Stderr != tt.out.Stderr || string(out.Result) != result.String() {
				t.Fatalf("the structured content does not have the whole outcome: %v", err)
			}
		})
	}
}
