package main

import (
	"cmp"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/safe-py/safepy/internal/testjail"
	"github.com/safe-py/safepy/internal/testserver"
)

// The framework's local runner, built and run as a user runs it: the contract's first example answers, and every
// line the process writes is Cloud Logging's JSON, the sandbox's own lines included (they went through the global
// slog logger, which only cmd/server set, and came out as plain text under the framework).
func TestLocalRunnerServesTheFunction(t *testing.T) {
	// The sandbox writes its harness under TMPDIR, where the jail's user must reach it (t.TempDir's is 0700).
	dir, err := os.MkdirTemp("", "safepy-local-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	binary := filepath.Join(dir, "local")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		t.Fatalf("building: %v\n%s", err, out)
	}
	rt := cmp.Or(os.Getenv("SAFEPY_RUNTIME_DIR"), filepath.Join(testserver.Root(), ".runtime"))
	cfg, note, err := testjail.Config(filepath.Join(testserver.Root(), "nsjail.cfg"), rt, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(note)
	t.Setenv("SAFEPY_NSJAIL_CONFIG", cfg)
	s := testserver.Start(t, []string{binary}, "LOCAL_ONLY=true", "TMPDIR="+dir)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the server's output:\n%s", strings.Join(s.Lines(), "\n"))
		}
	})
	s.WaitListening(t)

	resp, err := http.Post(s.URL+"/execute", "application/json",
		strings.NewReader(`{"script": "def main():\n    print('hello')\n    return {'ok': True}\n"}`))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := `{"result":{"ok":true},"stdout":"hello\n"}`; resp.StatusCode != 200 || strings.TrimSpace(string(body)) != want {
		t.Fatalf("%d %s, want 200 %s", resp.StatusCode, body, want)
	}
	s.Await(t, "the sandbox's start-up log", func() bool { return len(s.Entries("sandbox ready")) == 1 })
	for _, line := range s.Lines() {
		var entry map[string]any
		if err := json.Unmarshal([]byte(line), &entry); err != nil || entry["severity"] == nil {
			t.Errorf("not a Cloud Logging entry: %s", line)
		}
	}
}
