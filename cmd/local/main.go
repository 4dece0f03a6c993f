// Command local serves the Execute function with the Functions Framework's own local runner, as the framework's
// quickstart does: the function package is imported for its registration, and funcframework starts a server on
// $PORT (default 8080), on 127.0.0.1 only when LOCAL_ONLY=true. FUNCTION_TARGET defaults to Execute, so that the
// function answers on every path as it does on Cloud Run (unset, the framework would serve it on /Execute only). It is how a user of functions-framework-go runs
// any function locally (`make local`); the service prepares its sandbox on the first request (Prepare).
//
// Production and `make run` use cmd/server instead: it checks the jail before opening its port, caps connections
// and drains on SIGTERM, which the framework's runner does not.
package main

import (
	"log"
	"os"

	"github.com/GoogleCloudPlatform/functions-framework-go/funcframework"

	"github.com/safe-py/safepy" // registers Execute
)

func main() {
	if os.Getenv("FUNCTION_TARGET") == "" {
		os.Setenv("FUNCTION_TARGET", safepy.FunctionName)
	}
	port := "8080"
	if p := os.Getenv("PORT"); p != "" {
		port = p
	}
	host := ""
	if os.Getenv("LOCAL_ONLY") == "true" {
		host = "127.0.0.1"
	}
	if err := funcframework.StartHostPort(host, port); err != nil {
		log.Fatalf("funcframework.StartHostPort: %v", err)
	}
}
