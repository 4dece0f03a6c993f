// Package sandbox runs one untrusted Python script in a fresh nsjail jail and reports a typed outcome.
//
// The jail's policy is nsjail.cfg; this package adds only what differs per host or per execution (where the
// runtime is, the descriptors it passes in) and enforces the config's limits with cgroups, or with rlimits where
// the host has no usable cgroups. Every execution gets its own nsjail process, namespaces, cgroup and tmpfs.
package sandbox

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/safe-py/safepy/internal/cgroup"
	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/internal/pool"
	"github.com/safe-py/safepy/internal/uids"
)

//go:embed harness.py
var harnessSource []byte

// formingWait bounds how long a request waits for a jail its pool is forking ahead (they take tens of
// milliseconds) before it makes one of its own: only a jail that is stuck would take longer.
const formingWait = time.Second

// Runner runs scripts. It is safe for concurrent use; the caller bounds the concurrency.
type Runner struct {
	parts     // what its jails are made of
	cgroupErr error
	imports   []*regexp.Regexp // imports[i]: a script imports Preload[i]'s package
	forks     *forking         // nil: every jail is cold
	forkNote  string           // why there are no fork servers
	forkFails atomic.Int64
	pools     []*pool.Pool[warmJail] // pools[i] preloads Preload[:i]: pools[0] is plain
	running   atomic.Int64           // executions under way
	refilling chan struct{}          // one token: the pools launch one jail at a time between them

	mu       sync.Mutex
	closed   bool
	inflight sync.WaitGroup // Run calls under way
}

// ReadDefinition checks that the sandbox's pieces are installed and reads nsjail.cfg with the installed nsjail's
// schema: for a caller that needs the jails' limits before it makes the Runner (Config.Definition).
func ReadDefinition(cfg Config) (*jaildef.Definition, error) {
	python := filepath.Join(cfg.RuntimeDir, "python")
	for _, p := range []string{cfg.Nsjail, cfg.JailConfig, filepath.Join(python, "bin", "python3")} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("%w: %v (run runtime/install.sh, or `make run`)", ErrSandbox, err)
		}
	}
	def, err := jaildef.Read(cfg.Nsjail, cfg.JailConfig)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	return def, nil
}

// New checks the sandbox's pieces, prepares what every execution shares, and starts the pools of warm jails (if
// PoolSize > 0). ctx bounds the set-up: the fork servers' start and their proof with a real request. Whether a
// cold jail can run a script is for the caller to check, with a real Run.
func New(ctx context.Context, cfg Config) (*Runner, error) {
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
	def := cfg.Definition
	if def == nil {
		var err error
		if def, err = ReadDefinition(cfg); err != nil {
			return nil, err
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

	r := &Runner{parts: parts{cfg: cfg, def: def, limits: limits, timeNamespace: def.TimeNamespace(), cgroups: cg, harnessDir: dir, uids: block,
		command: []string{"/usr/local/bin/python3", "-I", "-u", "/safepy/harness.py"}}, cgroupErr: cgErr, refilling: make(chan struct{}, 1)}
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
		var extra []string
		limits, extra = withoutCgroups(limits)
		opts = append(opts, extra...)
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
		if r.forks, err = startForking(ctx, &r.parts, forkServerSettings{MaxAge: cfg.ForkServerAge, MaxForks: cfg.ForkServerForks}); err != nil {
			r.forkNote = "this host does not allow the fork path: " + err.Error()
		}
	}
	for i := 0; i <= len(cfg.Preload); i++ {
		r.pools = append(r.pools, r.newPool(cfg.PoolSize, cfg.PoolMaxAge, cfg.Preload[:i]))
	}
	return r, nil
}

// logForkFailure logs a request that could not be forked (it goes cold), at most once a second.
func (r *Runner) logForkFailure(err error) {
	now := time.Now().Unix()
	if last := r.forkFails.Load(); last != now && r.forkFails.CompareAndSwap(last, now) {
		r.cfg.Log.Warn("a jail could not be forked; it starts cold", "error", err.Error())
	}
}

// Config is the runner's configuration, with its defaults filled in.
func (r *Runner) Config() Config { return r.cfg }

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

// launch starts a jail whose harness has the preload modules imported before it reports ready: forked from the
// fork server of that preload set if one is ready, else cold. A warm jail (one for a pool) also takes, ahead of
// time, the copies of the fork server's pages a typical script would write.
func (r *Runner) launch(preload []string, warm bool) (*jail, error) {
	if fs := r.forks.server(preload); fs != nil {
		j, err := r.launchForked(fs, preload, warm)
		if err == nil {
			return j, nil
		}
		r.logForkFailure(err)
	}
	return r.launchCold(preload)
}

var errNoForkServer = errors.New("no fork server for the pool")

// newPool starts a pool of warm jails that import preload before they are ready.
func (r *Runner) newPool(size int, maxAge time.Duration, preload []string) *pool.Pool[warmJail] {
	return pool.New(pool.Config[warmJail]{
		Size:   size,
		MaxAge: maxAge,
		Fork: func(prefault bool) (warmJail, error) {
			fs := r.forks.server(preload)
			if fs == nil {
				return warmJail{}, errNoForkServer
			}
			j, err := r.launchForked(fs, preload, prefault)
			if err != nil {
				r.logForkFailure(err)
				return warmJail{}, err
			}
			return warmJail{j}, nil
		},
		Start: func() (warmJail, error) {
			j, err := r.launch(preload, true)
			return warmJail{j}, err
		},
		Busy: r.cfg.Busy,
		Turn: r.refilling,
	})
}
