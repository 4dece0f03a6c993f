package sandbox

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// The tests run the real nsjail and the real Python that runtime/install.sh installed; there is no fake jail.
// Without them the tests fail rather than skip: `make test` installs them first.
var runner *Runner

func testConfig() Config {
	rt := os.Getenv("SAFEPY_RUNTIME_DIR")
	if rt == "" {
		rt = "../.runtime"
	}
	return Config{
		Nsjail:     filepath.Join(rt, "bin", "nsjail"),
		JailConfig: "../nsjail.cfg",
		RuntimeDir: rt,
		Cgroup:     os.Getenv("SAFEPY_CGROUP"),
	}
}

// The shared runner is configured as the service runs by default: with a pool of warm jails. Requests that find
// the pool empty (the tests are quicker than its refills) run cold, so both paths run throughout.
func sharedConfig() Config {
	cfg := testConfig()
	cfg.PoolSize = 2
	return cfg
}

func TestMain(m *testing.M) {
	flag.Parse()
	if fuzzing() { // the fuzz targets need no jail; every fuzz worker would start the pools for nothing
		os.Exit(m.Run())
	}
	var err error
	runner, err = New(sharedConfig())
	if err != nil {
		fmt.Fprintf(os.Stderr, "sandbox tests need the real runtime (run `make test`): %v\n", err)
		os.Exit(1)
	}
	info := runner.Info()
	fmt.Fprintf(os.Stderr, "sandbox tests: enforcement %s %s\n", info.CgroupMode, info.CgroupNote)
	code := m.Run()
	runner.Close()
	os.Exit(code)
}

// fuzzing reports whether this test binary runs as the fuzzing coordinator or one of its workers.
func fuzzing() bool {
	f := flag.Lookup("test.fuzz")
	w := flag.Lookup("test.fuzzworker")
	return f != nil && f.Value.String() != "" || w != nil && w.Value.String() == "true"
}

func run(t *testing.T, script string) (Outcome, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := runner.Run(ctx, []byte(script))
	if err != nil {
		if _, ok := err.(*ScriptError); !ok {
			t.Fatalf("the sandbox itself failed: %v\nstderr: %s", err, out.Stderr)
		}
	}
	return out, err
}

// mustRun runs a script that must succeed and returns its result.
func mustRun(t *testing.T, script string) (string, Outcome) {
	t.Helper()
	out, err := run(t, script)
	if err != nil {
		t.Fatalf("script failed: %v\nstdout: %q\nstderr: %s", err, out.Stdout, out.Stderr)
	}
	return string(out.Result), out
}

// mustFail runs a script that must fail with kind (and limit, if not empty) and returns the error.
func mustFail(t *testing.T, script string, kind Kind, limit Limit) (*ScriptError, Outcome) {
	t.Helper()
	out, err := run(t, script)
	se, ok := err.(*ScriptError)
	if !ok {
		t.Fatalf("want %s, got result %s (err %v)\nstdout: %q", kind, out.Result, err, out.Stdout)
	}
	if se.Kind != kind || (limit != "" && se.Limit != limit) {
		t.Fatalf("want %s/%s, got %s/%s: %s\n%s", kind, limit, se.Kind, se.Limit, se.Message, se.Traceback)
	}
	return se, out
}
