package safepy

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/safe-py/safepy/sandbox"
)

// Config is the service's configuration, read once from the environment at start-up.
type Config struct {
	MaxBodyBytes   int64 // SAFEPY_MAX_BODY_BYTES
	MaxScriptBytes int   // SAFEPY_MAX_SCRIPT_BYTES
	Sandbox        sandbox.Config
}

// ConfigFromEnv reads the configuration from the environment, with the defaults the README's table lists.
func ConfigFromEnv() (Config, error) {
	var errs []error
	num := func(name string, def int) int {
		v := os.Getenv(name)
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			errs = append(errs, fmt.Errorf("%s must be a positive integer, not %q", name, v))
			return def
		}
		return n
	}
	str := func(name, def string) string {
		if v := os.Getenv(name); v != "" {
			return v
		}
		return def
	}
	runtimeDir := str("SAFEPY_RUNTIME_DIR", ".runtime")
	cfg := Config{
		MaxBodyBytes:   int64(num("SAFEPY_MAX_BODY_BYTES", 2<<20)),
		MaxScriptBytes: num("SAFEPY_MAX_SCRIPT_BYTES", 1<<20),
		Sandbox: sandbox.Config{
			RuntimeDir:     runtimeDir,
			Nsjail:         str("SAFEPY_NSJAIL", filepath.Join(runtimeDir, "bin", "nsjail")),
			JailConfig:     str("SAFEPY_NSJAIL_CONFIG", "nsjail.cfg"),
			Cgroup:         str("SAFEPY_CGROUP", "auto"),
			MaxStdoutBytes: num("SAFEPY_MAX_STDOUT_BYTES", 1<<20),
			MaxResultBytes: num("SAFEPY_MAX_RESULT_BYTES", 1<<20),
		},
	}
	if len(errs) > 0 {
		return cfg, fmt.Errorf("configuration: %v", errs)
	}
	return cfg, nil
}
