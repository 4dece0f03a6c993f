package safepy

// The routes: which of the service's ways in a request takes.

import (
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"cloud.google.com/go/logging"

	"github.com/safe-py/safepy/internal/cloudlog"
)

// ServeHTTP routes the contract's paths: POST /execute, /mcp, GET /health (and /healthz), 404 for the rest.
func (s *Service) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/execute":
		if r.Method != http.MethodPost {
			methodNotAllowed(w, "POST")
			return
		}
		// One log entry per execution request, written once the answer is out, with its httpRequest and trace.
		begin := time.Now()
		r = r.WithContext(cloudlog.WithRequest(r.Context(), r))
		rec := &recorder{ResponseWriter: w}
		entry := s.execute(rec, r)
		level := slog.LevelInfo
		if rec.status >= 500 {
			level = slog.LevelError
			if rec.status == http.StatusServiceUnavailable {
				level = slog.LevelWarn
			}
		}
		s.log.LogAttrs(r.Context(), level, "execution", append(entry, slog.Any(cloudlog.HTTPRequestKey, &logging.HTTPRequest{
			Request: loggable(r), RequestSize: r.ContentLength, Status: rec.status, ResponseSize: rec.size,
			Latency: time.Since(begin), RemoteIP: remoteIP(r.RemoteAddr)}))...)
	case "/mcp":
		s.serveMCP(w, r)
	case "/health", "/healthz": // Cloud Run's front end answers paths ending in z itself: /health is for it
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			methodNotAllowed(w, "GET, HEAD")
			return
		}
		if !s.ready.Load() {
			writeError(w, http.StatusServiceUnavailable, apiError{Type: "Unavailable", Message: "not ready"}, nil)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	default:
		writeError(w, http.StatusNotFound, apiError{Type: "NotFound",
			Message: fmt.Sprintf("no such path %q; use POST /execute or /mcp", clip(r.URL.Path, maxLoggedLen))}, nil)
	}
}
