// Command server is safe-py's production server: it serves the Execute function on $PORT (default 8080), in the
// Cloud Run image and locally (`make run`).
//
// Why a server of its own rather than the Functions Framework's funcframework.Start, which serves the same
// registered function (and which the function also supports, see function.go): Start's http.Server has no
// timeouts, no graceful shutdown and no connection cap, and it opens its port before anything checked that the
// sandbox works. Here the start-up self-check runs a real script in the real jail before the port opens (if the
// jail cannot be made, it logs why and exits 1); idle and slow clients cannot fill the connections; SIGTERM (as
// Cloud Run sends it) or Ctrl-C stops accepting, lets running executions finish within SAFEPY_SHUTDOWN_GRACE (8 s;
// Cloud Run allows 10), kills the jails of any still running, and exits 0.
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
	"github.com/safe-py/safepy/internal/connlimit"
)

func main() {
	cfg, log, err := safepy.Configure(context.Background(), os.Stdout)
	slog.SetDefault(log)
	if err == nil {
		err = run(cfg)
	}
	if err != nil {
		slog.Error("safe-py stopped", "error", err.Error())
		os.Exit(1)
	}
}

func run(cfg safepy.Config) error {
	svc, err := safepy.PrepareWith(cfg, slog.Default())
	if err != nil {
		return fmt.Errorf("the sandbox cannot run scripts, refusing to serve: %w", err)
	}
	defer svc.Close()

	host := "" // every interface: Cloud Run's front end reaches the container from outside
	if cfg.LocalOnly {
		host = "127.0.0.1" // `make run`: this machine only, not its network
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(host, cfg.Port))
	if err != nil {
		return err
	}
	// A cap on open connections that idle and slow clients cannot fill: at the cap, a new connection closes the
	// oldest one that is not serving a request.
	conns := connlimit.New(cfg.MaxConns)

	// Executions run under this context: cancelling it kills every jail still running.
	execCtx, killJails := context.WithCancel(context.Background())
	defer killJails()
	srv := &http.Server{
		Handler:     conns.Handler(http.HandlerFunc(safepy.Execute)),
		BaseContext: func(net.Listener) context.Context { return execCtx },
		ConnContext: conns.ConnContext,
		ConnState:   conns.ConnState,
		// A client has a few seconds for its header; the body and the answer are bounded by what the service
		// does (the wait for a slot plus a turn); an idle keep-alive connection is closed after a while.
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       30 * time.Second,
		MaxHeaderBytes:    64 << 10,
	}
	stop, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(conns.Listener(smallSendBuffers{ln})) }()
	slog.Info("serving", "address", ln.Addr().String(), "port", cfg.Port, "function", safepy.FunctionName, "max_conns", cfg.MaxConns)

	select {
	case err := <-errc:
		return err
	case <-stop.Done():
	}
	slog.Info("shutting down: no new requests; running executions may finish", "grace", cfg.ShutdownGrace.String())
	svc.Drain()
	graceCtx, cancelGrace := context.WithTimeout(context.Background(), cfg.ShutdownGrace)
	defer cancelGrace()
	if err := srv.Shutdown(graceCtx); err != nil {
		slog.Warn("grace period over: killing the jails still running", "error", err.Error())
		killJails()
		closeCtx, cancelClose := context.WithTimeout(context.Background(), time.Second)
		defer cancelClose()
		if err := srv.Shutdown(closeCtx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		srv.Close()
	}
	slog.Info("stopped")
	return nil
}

// sendBuffer is the kernel's send buffer of each connection (the kernel doubles it for its bookkeeping). Left to
// itself it grows to 4 MiB, which a client that does not read its answer would hold in kernel memory, and which
// would count as sent against the answer's minimum rate: the client would be cut off only once the server had
// waited out what those 4 MiB are worth at that rate. Half a MiB in flight still carries 5 MiB/s at a 100 ms
// round trip, and far more from Cloud Run's front end, which is close by.
const sendBuffer = 256 << 10

// smallSendBuffers sets every accepted connection's send buffer to sendBuffer.
type smallSendBuffers struct{ net.Listener }

func (l smallSendBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetWriteBuffer(sendBuffer) // at worst the kernel's default: an answer is still paced and bounded
	}
	return c, err
}
