// Command local serves the Execute function on $PORT (default 8080), locally and in the Cloud Run image.
//
// The function is registered with the Functions Framework in the root package's init. The framework's own Start
// serves it with an http.Server that has no timeouts and no graceful shutdown, so this main serves the same
// registered function from a server of its own; FUNCTION_TARGET must name it.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/safe-py/safepy"
)

func main() {
	if err := run(); err != nil {
		slog.Error("safe-py stopped", "error", err.Error())
		os.Exit(1)
	}
}

func run() error {
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	if target := os.Getenv("FUNCTION_TARGET"); target != "" && target != safepy.FunctionName {
		return fmt.Errorf("FUNCTION_TARGET is %q, but this binary serves only %q", target, safepy.FunctionName)
	}
	// The self-check runs before the port opens: a sandbox that cannot run scripts never serves.
	if _, err := safepy.Prepare(); err != nil {
		return fmt.Errorf("the sandbox cannot run scripts, refusing to serve: %w", err)
	}

	srv := &http.Server{
		Addr:              net.JoinHostPort("", port),
		Handler:           http.HandlerFunc(safepy.Execute),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    64 << 10,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	slog.Info("serving", "port", port, "function", safepy.FunctionName)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	slog.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 9*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
