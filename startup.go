package safepy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"time"

	"cloud.google.com/go/compute/metadata"

	"github.com/safe-py/safepy/internal/cloudlog"
)

// metadataWait bounds the one question start-up asks the metadata server: a slow or absent one delays the start
// by at most this, and the service then serves without trace names.
const metadataWait = 2 * time.Second

// Configure is the start-up both ways of serving share: cmd/server's main, and the function's first request under
// the Functions Framework's own server. It reads the configuration from the environment (callers keep what it
// returns: the environment is read once), finds the project for the logs' trace names, and builds the logger:
// this is the one place that builds the Cloud Logging handler, which writes one JSON object per line to out. The
// logger is returned even when the configuration is invalid, so that the caller can log why.
func Configure(ctx context.Context, out io.Writer) (Config, *slog.Logger, error) {
	cfg, err := ConfigFromEnv()
	if cfg.HeapLimit > 0 {
		debug.SetMemoryLimit(cfg.HeapLimit)
	}
	findProject(ctx, &cfg)
	log := slog.New(cloudlog.NewHandler(out, cloudlog.Options{ProjectID: cfg.ProjectID,
		Labels: map[string]string{"service": "safe-py"}}))
	level := slog.LevelInfo
	if cfg.ProjectID == "" && cfg.CloudRunService != "" {
		level = slog.LevelWarn // on Google Cloud, logs without trace names are a loss worth seeing
	}
	log.Log(ctx, level, "project for trace names", "project_id", cfg.ProjectID, "from", cfg.ProjectFrom, "note", cfg.ProjectNote)
	return cfg, log, err
}

// findProject sets the project for trace names: GOOGLE_CLOUD_PROJECT if set; else, on Google Cloud (K_SERVICE is
// set; Cloud Run sets no GOOGLE_CLOUD_PROJECT), the metadata server's answer, asked once and for at most
// metadataWait; else none.
func findProject(ctx context.Context, cfg *Config) {
	switch {
	case cfg.ProjectID != "":
		cfg.ProjectFrom = "env"
	case cfg.CloudRunService == "":
		cfg.ProjectFrom, cfg.ProjectNote = "none", "GOOGLE_CLOUD_PROJECT is unset and this is not Google Cloud (K_SERVICE is unset)"
	default:
		id, err := projectFromMetadata(ctx)
		if err != nil {
			cfg.ProjectFrom, cfg.ProjectNote = "none", err.Error()
			return
		}
		cfg.ProjectID, cfg.ProjectFrom = id, "metadata"
	}
}

// projectFromMetadata asks the metadata server (GCE_METADATA_HOST, else 169.254.169.254) for the project id.
func projectFromMetadata(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, metadataWait)
	defer cancel()
	// A client of its own: bounded, and never sent through a proxy from the environment.
	client := metadata.NewWithOptions(&metadata.Options{Client: &http.Client{Timeout: metadataWait,
		Transport: &http.Transport{DialContext: (&net.Dialer{Timeout: metadataWait}).DialContext}}})
	id, err := client.ProjectIDWithContext(ctx)
	host := cmp.Or(os.Getenv("GCE_METADATA_HOST"), "169.254.169.254")
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded):
		// Also what an absent server looks like: the library retries refused connections until the deadline.
		return "", fmt.Errorf("the metadata server (%s) did not answer with the project id within %s: %w", host, metadataWait, err)
	case err != nil:
		return "", fmt.Errorf("asking the metadata server (%s) for the project id: %w", host, err)
	case id == "":
		return "", errors.New("the metadata server answered an empty project id")
	}
	return id, nil
}
