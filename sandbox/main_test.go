package sandbox

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/safe-py/safepy/internal/testjail"
)

// The tests run the real nsjail and the real Python that runtime/install.sh installed; there is no fake jail.
// Without them the tests fail rather than skip: `make test` installs them first.
//
// There are two ways to make a jail, and the isolation, hostile and limit tests run on both (onBothPaths):
// forkedRunner forks its jails from fork servers, coldRunner starts an nsjail for each. runner is the one the
// test at hand uses.
var runner, forkedRunner, coldRunner *Runner

// jailConfig is the jail definition the tests use: nsjail.cfg, or where this machine is slower than the one its time
// limits are meant for, a copy with longer ones (testjail).
var jailConfig = "../nsjail.cfg"

func runtimeDir() string {
	if rt := os.Getenv("SAFEPY_RUNTIME_DIR"); rt != "" {
		return rt
	}
	return "../.runtime"
}

func testConfig() Config {
	rt := runtimeDir()
	return Config{
		Nsjail:     filepath.Join(rt, "bin", "nsjail"),
		JailConfig: jailConfig,
		RuntimeDir: rt,
		Cgroup:     os.Getenv("SAFEPY_CGROUP"),
	}
}

// The shared runners are configured as the service runs: with pools of warm jails. Requests that find a pool empty
// (the tests are quicker than its refills) get a jail made on the spot, so warm jails and fresh ones both run
// throughout, on both paths.
func sharedConfig(forked bool) Config {
	cfg := testConfig()
	cfg.PoolSize = 2
	cfg.ForkServers = forked
	return cfg
}

// onBothPaths runs fn once on jails forked from fork servers and once on cold ones.
func onBothPaths(t *testing.T, fn func(t *testing.T)) {
	t.Helper()
	for _, p := range []struct {
		name string
		r    *Runner
	}{{"forked", forkedRunner}, {"cold", coldRunner}} {
		t.Run(p.name, func(t *testing.T) {
			runner = p.r
			fn(t)
		})
	}
}

// testsBegan is the host's boot time clock when TestMain began, before any jail was made.
var testsBegan float64

func TestMain(m *testing.M) {
	testsBegan = hostBoottime()
	flag.Parse()
	if fuzzing() { // the fuzz targets need no jail; every fuzz worker would start the pools for nothing
		os.Exit(m.Run())
	}
	tmp, err := os.MkdirTemp("", "safepy-sandbox-test-")
	if err == nil {
		var note string
		jailConfig, note, err = testjail.Config(jailConfig, runtimeDir(), tmp)
		fmt.Fprintf(os.Stderr, "sandbox tests: %s\n", note)
	}
	if err == nil {
		forkedRunner, err = New(context.Background(), sharedConfig(true))
	}
	if err == nil {
		coldRunner, err = New(context.Background(), sharedConfig(false))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "sandbox tests need the real runtime (run `make test`): %v\n", err)
		os.Exit(1)
	}
	info := forkedRunner.Info()
	fmt.Fprintf(os.Stderr, "sandbox tests: enforcement %s %s; jails %s %s\n", info.CgroupMode, info.CgroupNote, info.Path, info.PathNote)
	if want := os.Getenv("SAFEPY_TEST_CGROUP_MODE"); want != "" && string(info.CgroupMode) != want {
		// A run meant for a kernel of one cgroup version (the CI's cgroup-v2 guest) that found another tests nothing.
		fmt.Fprintf(os.Stderr, "sandbox tests: enforcement is %s, but SAFEPY_TEST_CGROUP_MODE wants %s\n", info.CgroupMode, want)
		os.Exit(1)
	}
	if info.Path != "forked" {
		// Both paths must be tested; a host that refuses the fork path cannot test it, and says so loudly.
		fmt.Fprintf(os.Stderr, "sandbox tests: this host does not allow fork servers: %s\n", info.PathNote)
		os.Exit(1)
	}
	runner = forkedRunner
	code := m.Run()
	forkedRunner.Close()
	coldRunner.Close()
	os.RemoveAll(tmp)
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
