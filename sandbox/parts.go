package sandbox

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/safe-py/safepy/internal/cgroup"
	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/internal/uids"
)

// parts is what every jail is made of, the same for all of a runner's jails: its configuration and jail
// definition, the limits, the cgroups and uids it hands out, the harness, and nsjail's options. Jails and fork
// servers are made from it; the Runner above decides which path a request takes.
type parts struct {
	cfg        Config
	def        *jaildef.Definition // nsjail.cfg, read once
	limits     Limits
	cgroups    cgroup.Manager
	harnessDir string
	uids       *uids.Block
	// timeNamespace: each jail gets a time namespace whose clocks start with it (nsjail.cfg's clone_newtime,
	// made by the sandbox itself: clocks.go).
	timeNamespace bool
	opts          []string       // nsjail's options, rendered once; each jail adds its uid
	command       []string       // what nsjail runs; the harness's configuration is added per jail
	cleanups      sync.WaitGroup // jails being destroyed in the background
}

// commonOpts are the nsjail options a cold jail and a fork server share.
func (r *parts) commonOpts(configPath string) []string {
	runtimePython, _ := filepath.Abs(filepath.Join(r.cfg.RuntimeDir, "python"))
	return []string{
		"--config", configPath,
		"--log_fd", "5",
		// The Go side owns the cgroup (see internal/cgroup) and the deadline; nsjail's own timer is only a backstop.
		"--cgroup_mem_max", "0", "--cgroup_pids_max", "0", "--cgroup_cpu_ms_per_sec", "0",
		"--bindmount_ro", runtimePython + ":/usr/local",
		"--bindmount_ro", filepath.Join(r.harnessDir, "harness.py") + ":/safepy/harness.py",
	}
}

// harnessConfig is what the harness is told on its command line.
type harnessConfig struct {
	CPUSeconds   int64             `json:"cpu"`            // the script's CPU-time limit, counted from its arrival
	Rlimits      map[string]Rlimit `json:"rlimits"`        // the limits nsjail cannot set (jaildef.PinnedRlimits)
	Preload      []string          `json:"preload"`        // modules to import before the script arrives
	MaxFiles     int               `json:"max_files"`      // the output files' caps (files.go)
	MaxFileBytes int               `json:"max_file_bytes"` //
	MaxPathBytes int               `json:"max_path_bytes"` // the longest path an answer names
	CollectCPU   float64           `json:"collect_cpu"`    // the walk of /sandbox's bound, seconds of CPU
}

func (r *parts) harnessConfig(preload []string) harnessConfig {
	return harnessConfig{CPUSeconds: r.limits.CPUSeconds, Rlimits: jaildef.PinnedRlimits, Preload: preload,
		MaxFiles: MaxFiles, MaxFileBytes: MaxOutputBytes, MaxPathBytes: MaxPathBytes, CollectCPU: collectCPU}
}

// jailArgs is nsjail's command line for a jail whose processes are uid outside, preloading preload.
func (r *parts) jailArgs(uid int, preload []string) []string {
	hc, _ := json.Marshal(r.harnessConfig(preload))
	args := append([]string{}, r.opts...)
	args = append(args, "--user", fmt.Sprintf("%d:%d:1", jailUID, uid), "--")
	return append(append(args, r.command...), string(hc))
}

// stdoutText is what a client sees of the script's output: bytes that are not UTF-8 become U+FFFD.
func stdoutText(b []byte) string { return strings.ToValidUTF8(string(b), "\uFFFD") }

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// hint turns nsjail's account of a jail that could not be made into what to do about it.
func hint(nsjailLog []byte) string {
	log := string(nsjailLog)
	switch {
	case strings.Contains(log, "clone(flags=") && strings.Contains(log, "CLONE_NEWUSER") && strings.Contains(log, "failed"):
		return ". Hint: this host refuses new user namespaces. On Cloud Run, deploy with --execution-environment=gen2 " +
			"(gen1's gVisor refuses what nsjail needs); elsewhere run as root on a kernel that allows user namespaces " +
			"(user.max_user_namespaces > 0)"
	case strings.Contains(log, "try 'chmod o+x'"):
		return ". Hint: the jail's user cannot reach the runtime directory; every directory above SAFEPY_RUNTIME_DIR " +
			"must be searchable by others (or install the runtime elsewhere, such as /opt/safe-py)"
	}
	return ""
}

// firstLines returns the first n of nsjail's errors (or, if it logged none, its warnings): the first error is the
// cause, what follows are its consequences, and its informational lines say nothing of either.
func firstLines(b []byte, n int) string {
	var errs, warnings []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		switch {
		case strings.HasPrefix(l, "[I]") || strings.HasPrefix(l, "[D]"):
		case strings.HasPrefix(l, "[W]"):
			warnings = append(warnings, l)
		default:
			errs = append(errs, l)
		}
	}
	if len(errs) == 0 {
		errs = warnings
	}
	if len(errs) > n {
		errs = errs[:n]
	}
	return strings.Join(errs, " | ")
}
