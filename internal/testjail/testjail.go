// Package testjail gives the tests that start real jails a jail definition fit for the machine they run on.
//
// nsjail.cfg's time limits (3 s of wall time, 3 s of CPU) are meant for a machine that starts Python and imports
// pandas in about half a second. Where that takes longer (a loaded CI machine, or the cgroup-v2 guest, a User-mode
// Linux kernel that runs the same Python some 2-3 times slower), a test's own script could run out of a time meant
// for another machine, and the test would fail for the machine's speed, not for what it tests. So the tests measure
// the machine once, and where it is slower they use a copy of nsjail.cfg with both time limits multiplied by the
// factor, and say so in their log. Every other limit, and every assertion, stays as it is: a script that runs into
// its time limit still gets TimeoutError, only at the longer limit.
package testjail

import (
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"time"
)

// reference is how long starting the runtime's Python and importing pandas may take for nsjail.cfg's limits to
// hold as written.
const reference = 500 * time.Millisecond

// Config returns the jail definition the tests use, written from the one at cfgPath (nsjail.cfg) into dir, and a
// line for the test's log that says what was measured and what the tests use. runtimeDir is the sandbox runtime
// (its python/ is the jail's interpreter).
func Config(cfgPath, runtimeDir, dir string) (path, note string, err error) {
	took, err := importTime(runtimeDir)
	if err != nil {
		return "", "", fmt.Errorf("measuring this machine: %w", err)
	}
	factor := max(1, int(math.Ceil(float64(took)/float64(reference))))
	if factor == 1 {
		return cfgPath, fmt.Sprintf("jail time limits as nsjail.cfg writes them: this machine imports pandas in %.2f s", took.Seconds()), nil
	}
	data, err := os.ReadFile(cfgPath)
	if err != nil {
		return "", "", err
	}
	scaled, err := Scale(data, factor)
	if err != nil {
		return "", "", err
	}
	path = filepath.Join(dir, "nsjail.cfg")
	if err := os.WriteFile(path, scaled, 0o644); err != nil {
		return "", "", err
	}
	return path, fmt.Sprintf("jail time limits x%d for these tests: this machine imports pandas in %.2f s (nsjail.cfg's are for %.2f s)",
		factor, took.Seconds(), reference.Seconds()), nil
}

var timeLimits = regexp.MustCompile(`(?m)^(time_limit|rlimit_cpu): *(\d+)`)

// Scale multiplies the time limits of a jail definition (time_limit, rlimit_cpu) by factor.
func Scale(cfg []byte, factor int) ([]byte, error) {
	found := 0
	out := timeLimits.ReplaceAllFunc(cfg, func(m []byte) []byte {
		sub := timeLimits.FindSubmatch(m)
		n, _ := strconv.Atoi(string(sub[2]))
		found++
		return []byte(fmt.Sprintf("%s: %d", sub[1], n*factor))
	})
	if found != 2 {
		return nil, fmt.Errorf("the jail definition has %d of its two time limits (time_limit, rlimit_cpu)", found)
	}
	return out, nil
}

// importTime is the shortest of a few runs of the runtime's Python importing pandas, after one to warm the page
// cache.
func importTime(runtimeDir string) (time.Duration, error) {
	python, err := filepath.Abs(filepath.Join(runtimeDir, "python", "bin", "python3"))
	if err != nil {
		return 0, err
	}
	best := time.Duration(math.MaxInt64)
	for i := 0; i < 4; i++ {
		cmd := exec.Command(python, "-I", "-c", "import pandas")
		cmd.Env = []string{"LD_LIBRARY_PATH=" + filepath.Join(filepath.Dir(filepath.Dir(python)), "lib"), "OPENBLAS_NUM_THREADS=1"}
		begin := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("%s: %w: %s", python, err, out)
		}
		if took := time.Since(begin); i > 0 && took < best {
			best = took
		}
	}
	return best, nil
}
