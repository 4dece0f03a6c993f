// Package safepy is the HTTP edge of safe-py: it decodes and validates a request, hands the script to the
// sandbox package, and encodes the outcome as ../shared/CONTRACT.md describes. Policy lives in the sandbox.
package safepy

import (
	"log/slog"
	"net/http"
	"sync"

	"github.com/GoogleCloudPlatform/functions-framework-go/functions"
)

// FunctionName is the target the function is registered under (FUNCTION_TARGET).
const FunctionName = "Execute"

func init() {
	functions.HTTP(FunctionName, Execute)
}

var shared struct {
	once sync.Once
	svc  *Service
	err  error
}

// Prepare builds the service from the environment and runs its start-up self-check, once per process. The
// function calls it on first use; a main calls it (or PrepareWith) before serving, so that a broken sandbox stops
// the start.
func Prepare() (*Service, error) {
	shared.once.Do(func() {
		cfg, err := ConfigFromEnv()
		if err != nil {
			shared.err = err
			return
		}
		shared.svc, shared.err = NewService(cfg, slog.Default())
	})
	return shared.svc, shared.err
}

// PrepareWith is Prepare with a configuration the caller already read.
func PrepareWith(cfg Config) (*Service, error) {
	shared.once.Do(func() { shared.svc, shared.err = NewService(cfg, slog.Default()) })
	return shared.svc, shared.err
}

// Execute is the HTTP function: POST /execute and GET /healthz. The framework hands it every path.
func Execute(w http.ResponseWriter, r *http.Request) {
	svc, err := Prepare()
	if err != nil {
		// Fail closed: no sandbox, no execution, and the reason in the log and the answer.
		unavailable(w, r, err)
		return
	}
	svc.ServeHTTP(w, r)
}
