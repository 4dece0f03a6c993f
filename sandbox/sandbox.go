// Package sandbox runs one untrusted Python script in a fresh nsjail jail and reports a typed outcome.
//
// The jail's policy is nsjail.cfg; this package adds only what differs per host or per execution (where the
// runtime is, the descriptors it passes in) and enforces the config's limits with cgroups, or with rlimits where
// the host has no usable cgroups. Every execution gets its own nsjail process, namespaces, cgroup and tmpfs.
package sandbox

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/safe-py/safepy/internal/cgroup"
	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/internal/pool"
	"github.com/safe-py/safepy/internal/uids"
)

//go:embed harness.py
var harnessSource []byte

// AddressSpaceAllowance is added to the memory limit for RLIMIT_AS where there are no cgroups (see New).
const AddressSpaceAllowance = 192 << 20

// formingWait bounds how long a request waits for a jail its pool is forking ahead (they take tens of
// milliseconds) before it makes one of its own: only a jail that is stuck would take longer.
const formingWait = time.Second

// DefaultUIDBase is where the jails' outside uids start unless Config.UIDBase says otherwise.
const DefaultUIDBase = uids.DefaultBase

// Config says where the sandbox's pieces are. The zero value of each size means its default.
type Config struct {
	// Log is where the sandbox reports what it works around (a fork server that failed, a jail that starts cold
	// instead); the service passes its own, so that these lines are Cloud Logging's JSON under every server.
	// Default: slog.Default().
	Log *slog.Logger

	Nsjail     string // the nsjail binary
	JailConfig string // nsjail.cfg
	// Definition is nsjail.cfg already read (jaildef.Read with Nsjail and JailConfig), for a caller that needed its
	// limits before making the Runner; nil: New reads it.
	Definition *jaildef.Definition
	RuntimeDir string // what runtime/install.sh installed: python/ is mounted at /usr/local in the jail
	Cgroup     string // "auto" (default), "v1", "v2" or "none"

	MaxStdoutBytes int // default 1 MiB
	MaxStderrBytes int // default 1 MiB
	MaxResultBytes int // default 1 MiB

	// Warm jails are kept started ahead of time, waiting for a script, in pools of PoolSize each: plain ones (the
	// interpreter up) and one pool per prefix of Preload (with the default: numpy; numpy and pandas; those and
	// matplotlib.pyplot). A script gets
	// a jail from the smallest pool that has every Preload module it names, so a warm jail does ahead of time only
	// what the script would have done itself, never more. A warm jail serves one script and is destroyed; one
	// older than PoolMaxAge is replaced without serving. PoolSize 0 turns the pools off: every jail starts cold,
	// on the request's path.
	PoolSize   int
	PoolMaxAge time.Duration // default 5 minutes
	Preload    []string      // default numpy, pandas, matplotlib.pyplot
	// AllJailsMemory caps the memory of all jails together (running and warm), where there are cgroups; 0: no cap.
	AllJailsMemory int64

	// Busy reports that the service has no CPU to spare: the pools do not refill while it is true, so a
	// saturated service runs exactly as it would with no pools. Default: as many executions run as there are CPUs.
	Busy func() bool

	// StartupTimeout bounds how long a jail may take to come up before the sandbox counts as broken.
	StartupTimeout time.Duration // default 20 s

	// UIDBase is where the range of outside uids for the jails starts (see internal/uids). Default DefaultUIDBase.
	UIDBase int

	// ForkServers makes jails by forking them from fork servers (forkserver.go), where the host allows it, instead
	// of starting an nsjail per jail. The warm pools are then refilled by fork. PoolSize 0 turns them off too.
	ForkServers     bool
	ForkServerAge   time.Duration // a fork server older than this is replaced; default 10 minutes
	ForkServerForks int64         // a fork server that forked this many children is replaced; default 1000
}

// Runner runs scripts. It is safe for concurrent use; the caller bounds the concurrency.
type Runner struct {
	cfg        Config
	def        *jaildef.Definition // nsjail.cfg, read once
	limits     Limits
	cgroups    cgroup.Manager
	cgroupErr  error
	harnessDir string
	uids       *uids.Block
	// timeNamespace: each jail gets a time namespace whose clocks start with it (nsjail.cfg's clone_newtime,
	// made by the sandbox itself: clocks.go).
	timeNamespace bool
	opts          []string         // nsjail's options, rendered once; each jail adds its uid
	command       []string         // what nsjail runs; the harness's configuration is added per jail
	imports       []*regexp.Regexp // imports[i]: a script imports Preload[i]'s package
	forks         *forking         // nil: every jail is cold
	forkNote      string           // why there are no fork servers
	forkFails     atomic.Int64
	pools         []*pool.Pool[warmJail] // pools[i] preloads Preload[:i]: pools[0] is plain
	cleanups      sync.WaitGroup         // jails being destroyed in the background
	running       atomic.Int64           // executions under way
	refilling     chan struct{}          // one token: the pools launch one jail at a time between them

	mu       sync.Mutex
	closed   bool
	inflight sync.WaitGroup // Run calls under way
}

// Info describes how the sandbox is enforcing its policy on this host, for the start-up log.
type Info struct {
	CgroupMode CgroupMode
	CgroupNote string // why cgroups are not used, in rlimits mode
	Path       string // "forked" when jails are forked from fork servers, else "cold"
	PathNote   string // why jails are cold
	Limits     Limits
	Versions   string // what runtime/install.sh installed (nsjail, Python, packages)
}

// New checks the sandbox's pieces, prepares what every execution shares, and starts the pools of warm jails (if
// PoolSize > 0). Whether a jail can actually run a script is for the caller to check, with a real Run.
func New(cfg Config) (*Runner, error) {
	if cfg.MaxStdoutBytes <= 0 {
		cfg.MaxStdoutBytes = 1 << 20
	}
	if cfg.MaxResultBytes <= 0 {
		cfg.MaxResultBytes = 1 << 20
	}
	if cfg.MaxStderrBytes <= 0 {
		cfg.MaxStderrBytes = 1 << 20
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.StartupTimeout <= 0 {
		cfg.StartupTimeout = 20 * time.Second
	}
	if cfg.Cgroup == "" {
		cfg.Cgroup = "auto"
	}
	if cfg.PoolMaxAge <= 0 {
		cfg.PoolMaxAge = 5 * time.Minute
	}
	if cfg.Preload == nil {
		cfg.Preload = []string{"numpy", "pandas", "matplotlib.pyplot"}
	}
	if cfg.UIDBase == 0 {
		cfg.UIDBase = uids.DefaultBase
	}
	if cfg.ForkServerAge <= 0 {
		cfg.ForkServerAge = 10 * time.Minute
	}
	if cfg.ForkServerForks <= 0 {
		cfg.ForkServerForks = 1000
	}
	python := filepath.Join(cfg.RuntimeDir, "python")
	for _, p := range []string{cfg.Nsjail, cfg.JailConfig, filepath.Join(python, "bin", "python3")} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("%w: %v (run runtime/install.sh, or `make run`)", ErrSandbox, err)
		}
	}
	def := cfg.Definition
	if def == nil {
		var err error
		if def, err = jaildef.Read(cfg.Nsjail, cfg.JailConfig); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
		}
	}
	limits := def.Limits()
	block, err := uids.Claim(cfg.UIDBase)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	cg, cgErr := cgroup.Detect(cfg.Cgroup, cgroupLimits(limits), cfg.Nsjail, cfg.AllJailsMemory)
	if cg == nil {
		block.Close()
		return nil, fmt.Errorf("%w: cgroups (%s) unusable: %w", ErrSandbox, cfg.Cgroup, cgErr)
	}

	// The harness goes into a file of its own, which the jail mounts read-only.
	dir, err := os.MkdirTemp("", fmt.Sprintf("safepy-%d-harness-", os.Getpid()))
	if err != nil {
		block.Close()
		cg.Close()
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	harness := filepath.Join(dir, "harness.py")
	err = os.WriteFile(harness, harnessSource, 0o444)
	if err == nil {
		err = os.Chmod(dir, 0o755) // MkdirTemp makes 0700; the jail's user must be able to reach the file
	}
	if err != nil {
		os.RemoveAll(dir)
		block.Close()
		cg.Close()
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}

	r := &Runner{cfg: cfg, def: def, limits: limits, timeNamespace: def.TimeNamespace(), cgroups: cg, cgroupErr: cgErr, harnessDir: dir, uids: block,
		command: []string{"/usr/local/bin/python3", "-I", "-u", "/safepy/harness.py"}, refilling: make(chan struct{}, 1)}
	if err := os.WriteFile(filepath.Join(dir, "jail.cfg"), []byte(def.ColdConfig()), 0o444); err != nil {
		os.RemoveAll(dir)
		block.Close()
		cg.Close()
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	opts := append(r.commonOpts(filepath.Join(dir, "jail.cfg")),
		"--pass_fd", "3", "--pass_fd", "4",
		// nsjail's own timer and CPU limit only bound a jail that never gets a script: a warm jail waits in the pool
		// up to PoolMaxAge, and the harness sets the script's CPU limit when the script arrives.
		"--time_limit", strconv.Itoa(int((cfg.PoolMaxAge+limits.Wall+cfg.StartupTimeout)/time.Second)+1),
		"--rlimit_cpu", strconv.FormatInt(limits.CPUSeconds+startupCPUSeconds, 10))
	if cg.Mode() == CgroupNone {
		// Without cgroups memory is bounded by address space, which counts what libraries reserve but never use:
		// numpy and pandas reserve some 150 MiB. The allowance keeps a pandas script's 200 MiB possible.
		// RLIMIT_NPROC counts the jail's user in its own user namespace: the harness's init and the script.
		opts = append(opts, "--rlimit_as", strconv.FormatInt((limits.MemoryBytes+AddressSpaceAllowance)>>20, 10),
			"--rlimit_nproc", strconv.FormatInt(limits.Processes+1, 10))
		as := uint64(limits.MemoryBytes + AddressSpaceAllowance)
		limits.Rlimits["RLIMIT_AS"] = Rlimit{Soft: as, Hard: as}
		nproc := uint64(limits.Processes + 1)
		limits.Rlimits["RLIMIT_NPROC"] = Rlimit{Soft: nproc, Hard: nproc}
	}
	r.limits, r.opts = limits, opts
	for _, m := range cfg.Preload {
		r.imports = append(r.imports, importPattern(m))
	}
	if r.cfg.Busy == nil {
		cpus := int64(runtime.NumCPU())
		r.cfg.Busy = func() bool { return r.running.Load() >= cpus }
	}
	switch {
	case !cfg.ForkServers:
		r.forkNote = "fork servers are turned off"
	case cfg.PoolSize == 0:
		r.forkNote = "the pool size is 0: every jail starts cold"
	case cg.Mode() == CgroupNone:
		r.forkNote = "fork servers need cgroups"
	default:
		if r.forks, err = startForking(r, forkServerSettings{MaxAge: cfg.ForkServerAge, MaxForks: cfg.ForkServerForks}); err != nil {
			r.forkNote = "this host does not allow the fork path: " + err.Error()
		}
	}
	for i := 0; i <= len(cfg.Preload); i++ {
		r.pools = append(r.pools, newPool(r, cfg.PoolSize, cfg.PoolMaxAge, cfg.Preload[:i]))
	}
	return r, nil
}

// commonOpts are the nsjail options a cold jail and a fork server share.
func (r *Runner) commonOpts(configPath string) []string {
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

// logForkFailure logs a request that could not be forked (it goes cold), at most once a second.
func (r *Runner) logForkFailure(err error) {
	now := time.Now().Unix()
	if last := r.forkFails.Load(); last != now && r.forkFails.CompareAndSwap(last, now) {
		r.cfg.Log.Warn("a jail could not be forked; it starts cold", "error", err.Error())
	}
}

// Info reports the enforcement mode and limits.
func (r *Runner) Info() Info {
	info := Info{CgroupMode: r.cgroups.Mode(), Limits: r.limits, Path: "cold", PathNote: r.forkNote}
	if r.forks != nil {
		info.Path = "forked"
	}
	if v, err := os.ReadFile(filepath.Join(r.cfg.RuntimeDir, "versions.txt")); err == nil {
		info.Versions = strings.Join(strings.Fields(strings.ReplaceAll(string(v), "\n", "; ")), " ")
	}
	if r.cgroupErr != nil {
		info.CgroupNote = r.cgroupErr.Error()
	}
	return info
}

// Limits returns the jail's limits as read from nsjail.cfg.
func (r *Runner) Limits() Limits { return r.limits }

// MaxOutcomeBytes is the most an Outcome's text and files can hold: stdout and stderr at their caps (twice, for
// invalid bytes each replaced by a three-byte U+FFFD), the result at its cap and the files frame at its.
func (r *Runner) MaxOutcomeBytes() int64 {
	return int64(2*r.cfg.MaxStdoutBytes + 2*r.cfg.MaxStderrBytes + r.cfg.MaxResultBytes + maxFilesFrame)
}

// takeWarm takes a warm jail for a script whose preloadIndex is want: from the smallest pool that has every
// preloaded module the script names anywhere in its source. The choice is a hint for speed only: every pool's jail is the same jail, and a
// script that imports pandas in a plain jail simply imports it itself. Without fork servers, an empty pool's
// request takes a smaller pool's jail (which still saves starting the interpreter); with them, forking the right
// jail on the spot is faster than importing what the smaller one lacks.
func (r *Runner) takeWarm(want int) *jail {
	for i := want; i >= 0; i-- {
		if r.forks != nil && i < want {
			break
		}
		if j, ok := r.pools[i].Take(); ok {
			return j.jail
		}
	}
	return nil
}

// preloadIndex is the largest prefix of Preload whose last module's package the script imports: an import or
// from statement that names it ("matplotlib" for matplotlib.pyplot, so that `from matplotlib import pyplot`
// counts too). A name in a comment or a string does not count: the preload set decides the jail's memory (what
// the fork server holds is taken off it), so only what the script really imports may choose it.
func (r *Runner) preloadIndex(script []byte) int {
	i := len(r.imports)
	for i > 0 && !r.imports[i-1].Match(script) {
		i--
	}
	return i
}

// importPattern matches a line that imports pkg.
func importPattern(module string) *regexp.Regexp {
	pkg, _, _ := strings.Cut(module, ".")
	q := regexp.QuoteMeta(pkg)
	return regexp.MustCompile(`(?m)^[ \t]*(?:from[ \t]+` + q + `\b|import[ \t]+[^\n#]*\b` + q + `\b)`)
}

// Close stops the pools, destroys their warm jails, and removes what New created.
func (r *Runner) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	for _, p := range r.pools {
		p.Close()
	}
	r.inflight.Wait()
	r.cleanups.Wait()
	r.forks.close()
	r.cgroups.Close()
	r.uids.Close()
	return os.RemoveAll(r.harnessDir)
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

func (r *Runner) harnessConfig(preload []string) harnessConfig {
	return harnessConfig{CPUSeconds: r.limits.CPUSeconds, Rlimits: jaildef.PinnedRlimits, Preload: preload,
		MaxFiles: MaxFiles, MaxFileBytes: MaxOutputBytes, MaxPathBytes: maxPathBytes, CollectCPU: collectCPU}
}

// jailArgs is nsjail's command line for a jail whose processes are uid outside, preloading preload.
func (r *Runner) jailArgs(uid int, preload []string) []string {
	hc, _ := json.Marshal(r.harnessConfig(preload))
	args := append([]string{}, r.opts...)
	args = append(args, "--user", fmt.Sprintf("%d:%d:1", jailUID, uid), "--")
	return append(append(args, r.command...), string(hc))
}

// WarmJails is how many warm jails are ready now, in all pools, and how many the pools keep. Bare jails (forked
// without prefaulting while requests came back to back, and replaced once they stop) do not count: the pools
// are at rest when it reports them full.
func (r *Runner) WarmJails() (ready, size int) {
	for _, p := range r.pools {
		ready += p.Settled()
		size += p.Size()
	}
	return ready, size
}

// ColdCommand is the nsjail command line of a cold jail, as Run uses it: for measuring the floor under the service
// (cmd/bench). Descriptors 3, 4 and 5 must be the script, the result channel and nsjail's log. Every jail started
// with it is the same uid outside, which the runner keeps for it until Close.
func (r *Runner) ColdCommand() (path string, args []string, err error) {
	uid, err := r.uids.Take()
	if err != nil {
		return "", nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	return r.cfg.Nsjail, r.jailArgs(uid, nil), nil
}

// Run executes script in a fresh jail and returns its outcome. The jail is a warm one from a pool when one is
// ready, else one started now. When Run returns, every process of the jail is stopped or has been sent SIGKILL;
// killing the stopped ones, the kernel's reaping and the cgroup's removal finish just after, in the background
// (Close waits for them).
//
// It returns a *ScriptError when the script failed (the Outcome then still carries its stdout), an error wrapping
// ErrSandbox when the sandbox itself failed, and ctx's error when ctx ended first (the jail is killed).
func (r *Runner) Run(ctx context.Context, script []byte, files ...File) (Outcome, error) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return Outcome{}, fmt.Errorf("%w: the runner is closed", ErrSandbox)
	}
	r.inflight.Add(1)
	r.mu.Unlock()
	defer r.inflight.Done()
	r.running.Add(1)
	defer func() {
		r.running.Add(-1)
		for _, p := range r.pools {
			p.Poke()
		}
	}()
	want := r.preloadIndex(script) // a scan of the whole script: once
	j := r.takeWarm(want)
	if j == nil && r.forks != nil {
		if w, ok := r.pools[want].AwaitForming(ctx, formingWait); ok {
			j = w.jail
		}
	}
	warm := j != nil
	if !warm {
		// Forked from the fork server that has what the script names, if there is one; else a plain cold jail
		// (a cold jail that preloaded would only do what the script does itself).
		preload := r.cfg.Preload[:want]
		if r.forks == nil {
			preload = nil
		}
		var err error
		if j, err = r.launch(preload, false); err != nil {
			return Outcome{}, err
		}
		if err := j.awaitReady(ctx); err != nil {
			var ctxErr error
			if !errors.Is(err, ErrSandbox) {
				ctxErr = err
			}
			return j.finish(false, ctxErr) // with nsjail's own account of why the jail did not come up
		}
	}
	out, err := j.run(ctx, script, files)
	out.Warm, out.Forked = warm, j.fs != nil
	return out, err
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
