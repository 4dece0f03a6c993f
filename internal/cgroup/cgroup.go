// Package cgroup gives each jail a cgroup of its own, with its limits, on whichever hierarchy the host offers
// (v2, v1), or nothing where it offers none (rlimits mode: the Manager and its cgroups are there all the same and
// do nothing, so callers never test for their absence).
//
// The Go side owns the jail's cgroup rather than letting nsjail make one, because it must read the cgroup's
// events (was the OOM killer or the process limit involved?) after the jail has ended, and be able to kill
// everything in it at the deadline. nsjail removes its own cgroup before anyone could read it.
//
// Each runner has a directory of its own under a shared "safepy" one (safepy/PID-N), so that several servers on
// a machine never see, count or cap each other's jails, and its jails are children of it.
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Mode says how the jail's memory, process and CPU limits are enforced on this host.
type Mode string

const (
	V1   Mode = "cgroup-v1"
	V2   Mode = "cgroup-v2"
	None Mode = "rlimits" // no usable cgroups: RLIMIT_AS and RLIMIT_NPROC instead
)

// Limits are one cgroup's limits.
type Limits struct {
	MemoryBytes int64
	Processes   int64 // every task of the cgroup, the jail's own too
	CPUMsPerSec int64
}

// Manager is a runner's cgroups: a directory per hierarchy under which each jail gets a child.
type Manager interface {
	Mode() Mode
	// Create makes a jail's cgroup, named id, with its limits.
	Create(id string, l Limits) (Cgroup, error)
	// Dirs lists the runner's directories (one per hierarchy; none in rlimits mode).
	Dirs() []string
	// Close removes the runner's directories, which its jails have left empty.
	Close()

	limitAll(total int64) error
}

// Cgroup is one jail's cgroup.
type Cgroup interface {
	// Start starts cmd so that its first process, and so everything it forks, is born inside the cgroup: there is
	// no moment in which a jailed process runs outside its limits. setup, if not nil, runs first on the OS thread
	// that forks, and changes that thread for good (it makes the time namespace the thread's children are born
	// in); the thread is then thrown away once ended is closed.
	Start(cmd *exec.Cmd, setup func() error, ended <-chan struct{}) error
	// ProcsFiles opens the cgroup's cgroup.procs files for writing, one per hierarchy: a process that is handed
	// them can move itself in (the kernel checks the credentials of whoever opened the file, here root).
	ProcsFiles() ([]*os.File, error)
	// Procs lists the processes in the cgroup, every hierarchy's (a pid may be listed more than once).
	Procs() []int
	// Contains reports whether any thread of pid is in the cgroup.
	Contains(pid int) bool
	// Kill kills every process at once where the kernel can (v2's cgroup.kill, kernels since 5.14); the caller
	// signals what Procs lists all the same, which covers older kernels and v1.
	Kill()
	// MemoryPeak is the most the cgroup has held; 0 if it cannot be read.
	MemoryPeak() int64
	// MemoryUsage is what the cgroup holds now; 0 if it cannot be read.
	MemoryUsage() int64
	// MemoryHeld is what the cgroup holds now that the kernel would not reclaim for another cgroup's need: its
	// usage less the page cache of files and (v2) the reclaimable kernel caches (dentries, inodes). Those are
	// charged to whichever cgroup read a file first, which for the libraries every jail maps is a fork server,
	// and a cold jail that finds them cached pays nothing for them; it is no part of a jail's share of its fork
	// server.
	MemoryHeld() int64
	// Events reports whether the OOM killer ran in the cgroup and whether a fork was refused by its process limit.
	Events() (oomKilled, pidsMax bool)
	// Dirs lists the cgroup's directories (one per hierarchy).
	Dirs() []string
	// Remove removes the cgroup's directories; the caller kills what is in them first.
	Remove() error
}

// startLocked runs start on an OS thread locked for the purpose, after setup.
//
// cgroup v1 places threads, not processes: the thread moves into the jail's cgroups, forks, and moves back. A
// time namespace cannot be left by a thread of a process that has others: that thread is thrown away (the runtime
// ends a thread whose goroutine exits locked; the main thread it only parks), but not before ended is closed: a
// child's parent-death signal (Pdeathsig) follows the thread that forked it, not the process. The Go runtime never
// clones a new thread from a locked one, so nothing else follows the thread. start reports whether the thread is
// as it was.
func startLocked(setup func() error, ended <-chan struct{}, start func() (reusable bool, err error)) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		reusable, err := false, error(nil)
		if setup != nil {
			err = setup()
		}
		if err == nil {
			reusable, err = start()
			reusable = reusable && setup == nil
		}
		done <- err
		if reusable {
			runtime.UnlockOSThread()
		} else if err == nil {
			<-ended
		}
	}()
	return <-done
}

// procsOf lists the processes in the directories' cgroup.procs files; a directory that cannot be read lists none.
func procsOf(dirs []string) []int {
	var out []int
	for _, dir := range dirs {
		data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil {
				out = append(out, pid)
			}
		}
	}
	return out
}

// openProcs opens the directories' cgroup.procs files for writing.
func openProcs(dirs []string) ([]*os.File, error) {
	var out []*os.File
	for _, dir := range dirs {
		f, err := os.OpenFile(filepath.Join(dir, "cgroup.procs"), os.O_WRONLY, 0)
		if err != nil {
			for _, o := range out {
				o.Close()
			}
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}

// containsProcess reports whether any thread of pid is in the jail's cgroup whose directory (any hierarchy's) is
// dir.
func containsProcess(pid int, dir string) bool {
	rel := "/safepy/" + filepath.Base(filepath.Dir(dir)) + "/" + filepath.Base(dir) + "\n" // how /proc/PID/cgroup ends the jail's path
	// The process's own file is its main thread's; one whose main thread has ended may not show the cgroup its
	// other threads still run in: any thread of it in the jail's cgroup counts.
	in := func(file string) bool {
		data, err := os.ReadFile(file)
		return err == nil && strings.Contains(string(data), rel)
	}
	if in("/proc/" + strconv.Itoa(pid) + "/cgroup") {
		return true
	}
	threads, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/cgroup") // only then: off the common path
	for _, t := range threads {
		if in(t) {
			return true
		}
	}
	return false
}

// removeDirs removes the directories of a cgroup whose processes were killed.
func removeDirs(dirs []string) error {
	var errs []error
	for _, dir := range dirs {
		var err error
		for i := 0; i < 200; i++ { // rmdir is refused while a killed task is still exiting
			if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				err = nil
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// applySettings writes a new cgroup's limits: each a file and its value. Those of swap are skipped where the
// kernel has no swap accounting and no swap is on: there is no swap to limit. With swap on and no accounting, a
// jail could swap past its memory limit: that is an error.
func applySettings(settings [][2]string) error {
	for _, s := range settings {
		if err := writeFile(s[0], s[1]); err != nil {
			optional := strings.HasSuffix(s[0], "swap.max") || strings.HasSuffix(s[0], "swappiness") ||
				strings.HasSuffix(s[0], "memsw.limit_in_bytes")
			if optional && errors.Is(err, os.ErrNotExist) {
				if !swapOn() {
					continue
				}
				return fmt.Errorf("setting %s: swap is on, and the kernel does not account it per cgroup "+
					"(swapaccount=0?): a jail could swap past its memory limit", s[0])
			}
			return fmt.Errorf("setting %s: %w", s[0], err)
		}
	}
	return nil
}

// swapsFile lists the swap areas in use (a variable for tests).
var swapsFile = "/proc/swaps"

// swapOn says whether any swap area is in use; unreadable counts as in use.
func swapOn() bool {
	data, err := os.ReadFile(swapsFile)
	if err != nil {
		return true
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	return len(lines) > 1 // a header line, then one per area
}

// held is usage less what a memory.stat's text says the kernel would reclaim; fileKey names its page cache.
func held(usage int64, stat []byte, fileKey string) int64 {
	// tmpfs pages are counted as files, and are not reclaimed (without swap).
	reclaimable := parseCounter(stat, fileKey) - parseCounter(stat, "shmem") + parseCounter(stat, "slab_reclaimable")
	return usage - max(reclaimable, 0)
}

// counter reads key's value from a file of "key value" lines (memory.stat, memory.events, pids.events,
// memory.oom_control); 0 if there is none.
func counter(path, key string) int64 {
	data, _ := os.ReadFile(path)
	return parseCounter(data, key)
}

func parseCounter(data []byte, key string) int64 {
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == key {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}

// number reads a file that holds one number; 0 if it cannot.
func number(path string) int64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	return n
}

func writeFile(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

type mount struct {
	fstype string
	dir    string
	opts   map[string]bool
}

func readMounts(path string) ([]mount, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseMounts(f)
}

// parseMounts reads the cgroup file systems of a mountinfo file.
func parseMounts(r io.Reader) ([]mount, error) {
	var out []mount
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 || (qf[0] != "cgroup" && qf[0] != "cgroup2") {
			continue
		}
		m := mount{fstype: qf[0], dir: pf[4], opts: map[string]bool{}}
		for _, o := range strings.Split(qf[2], ",") {
			m.opts[o] = true
		}
		out = append(out, m)
	}
	return out, sc.Err()
}

// parseOwn reads /proc/self/cgroup: controller (or "" for v2) to this process's path in that hierarchy.
func parseOwn(data []byte) map[string]string {
	out := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			out[c] = parts[2]
		}
	}
	return out
}

// runnerSeq numbers the runners of this process.
var runnerSeq atomic.Int64

// runnerDir names a new runner's cgroup directory: this process's pid (a dead server's directories are found by
// it) and a number.
func runnerDir() string { return fmt.Sprintf("%d-%d", os.Getpid(), runnerSeq.Add(1)) }

// removeStale removes what servers that are gone left under a "safepy" directory: their jails' cgroups, if empty,
// and their own.
func removeStale(safepy string) {
	entries, _ := os.ReadDir(safepy)
	for _, e := range entries {
		pidText, _, ok := strings.Cut(e.Name(), "-")
		pid, err := strconv.Atoi(pidText)
		if !ok || err != nil || !e.IsDir() || unix.Kill(pid, 0) == nil {
			continue
		}
		dir := filepath.Join(safepy, e.Name())
		jails, _ := os.ReadDir(dir)
		for _, j := range jails {
			if j.IsDir() {
				os.Remove(filepath.Join(dir, j.Name()))
			}
		}
		os.Remove(dir)
	}
}
