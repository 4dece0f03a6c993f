package cloudlog

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/logging"
)

func decodeLines(t *testing.T, b []byte) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("not one JSON object per line: %q", line)
		}
		out = append(out, m)
	}
	return out
}

func TestEntryShape(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(NewHandler(&buf, Options{ProjectID: "my-project", Labels: map[string]string{"service": "safe-py"}}))

	req := httptest.NewRequest("POST", "http://example.test/execute", strings.NewReader("{}"))
	req.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	log.With("component", "http").WithGroup("exec").Warn("execution", "outcome", "TimeoutError", "run", 1500*time.Millisecond,
		"err", errors.New("boom"),
		slog.Any(HTTPRequestKey, &logging.HTTPRequest{Request: req, Status: 422, ResponseSize: 123, Latency: 1500 * time.Millisecond}))

	req2 := httptest.NewRequest("GET", "/x", nil)
	req2.Header.Set("X-Cloud-Trace-Context", "105445aa7843bc8bf206b12000100000/1;o=1")
	log.ErrorContext(WithRequest(context.Background(), req2), "in a request")
	log.Debug("dropped")
	log.Info("plain", "n", 3)

	lines := decodeLines(t, buf.Bytes())
	if len(lines) != 3 {
		t.Fatalf("%d lines: %s", len(lines), buf.String())
	}
	first := lines[0]
	want := map[string]any{
		"severity":                      "WARNING",
		"message":                       "execution",
		"component":                     "http",
		"logging.googleapis.com/trace":  "projects/my-project/traces/4bf92f3577b34da6a3ce929d0e0e4736",
		"logging.googleapis.com/spanId": "00f067aa0ba902b7",
	}
	for k, v := range want {
		if first[k] != v {
			t.Errorf("%s = %v, want %v", k, first[k], v)
		}
	}
	if g, _ := first["exec"].(map[string]any); g["outcome"] != "TimeoutError" || g["run"] != "1.5s" || g["err"] != "boom" {
		t.Errorf("grouped attributes: %v", first["exec"])
	}
	if _, err := time.Parse(time.RFC3339Nano, first["time"].(string)); err != nil {
		t.Errorf("time %v is not RFC 3339", first["time"])
	}
	hr, _ := first["httpRequest"].(map[string]any)
	if hr["requestMethod"] != "POST" || hr["requestUrl"] != "http://example.test/execute" || hr["status"] != 422.0 ||
		hr["responseSize"] != "123" || hr["latency"] != "1.500s" {
		t.Errorf("httpRequest %v", hr)
	}
	if l, _ := first["logging.googleapis.com/labels"].(map[string]any); l["service"] != "safe-py" {
		t.Errorf("labels %v", first["logging.googleapis.com/labels"])
	}

	second := lines[1]
	if second["severity"] != "ERROR" || second["logging.googleapis.com/trace"] != "projects/my-project/traces/105445aa7843bc8bf206b12000100000" ||
		second["logging.googleapis.com/trace_sampled"] != true || second["httpRequest"] != nil {
		t.Errorf("context-correlated entry: %v", second)
	}
	if third := lines[2]; third["severity"] != "INFO" || third["n"] != 3.0 || third["logging.googleapis.com/trace"] != nil {
		t.Errorf("plain entry: %v", third)
	}
}

func TestNoProjectNoTrace(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(NewHandler(&buf, Options{}))
	req := httptest.NewRequest("GET", "/", nil)
	req.Header.Set("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	log.InfoContext(WithRequest(context.Background(), req), "x")
	if line := decodeLines(t, buf.Bytes())[0]; line["logging.googleapis.com/trace"] != nil {
		t.Fatalf("a trace without a project: %v", line)
	}
}
