package sandbox

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/safe-py/safepy/internal/jaildef"
)

// CgroupMode says how the jail's memory, process and CPU limits are enforced on this host.
type CgroupMode string

const (
	CgroupV1   CgroupMode = "cgroup-v1"
	CgroupV2   CgroupMode = "cgroup-v2"
	CgroupNone CgroupMode = "rlimits" // no usable cgroups: RLIMIT_AS and RLIMIT_NPROC instead
)

// The Go side owns the jail's cgroup rather than letting nsjail make one, because it must read the cgroup's
// events (was the OOM killer or the process limit involved?) after the jail has ended, and be able to kill
// everything in it at the deadline. nsjail removes its own cgroup before anyone could read it.
//
// Each runner has a directory of its own under a shared "safepy" one (safepy/PID-N), so that several servers on
// a machine never see, count or cap each other's jails, and its jails are children of it.
type cgroups struct {
	mode CgroupMode
	// v1: controller name -> the runner's directory, under which each jail gets a child ("…/memory/safepy/PID-N").
	v1 map[string]string
	// v1: controller name -> this process's own cgroup, under which the "safepy" directory is and to which its
	// threads return after starting a jail.
	v1home map[string]string
	// v2: the runner's directory, under which each jail gets a child.
	v2 string
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

// close removes the runner's directories, which its jails have left empty.
func (c *cgroups) close() {
	dirs := []string{c.v2}
	for _, d := range c.v1 {
		dirs = append(dirs, d)
	}
	for _, d := range dirs {
		if d != "" {
			os.Remove(d)
		}
	}
}

var v1Controllers = []string{"memory", "pids", "cpu"}

// jailOverheadTasks are the cgroup's tasks that are not the script's: nsjail and the harness's init. The script
// gets the whole process limit for itself.
const jailOverheadTasks = jaildef.OverheadTasks

// detectCgroups finds a cgroup hierarchy this process may use and prepares a "safepy" parent in it.
// want is "auto", "v1", "v2" or "none". With "auto" it prefers v2, then v1, then rlimits.
func detectCgroups(want string, l Limits, probe string, total int64) (*cgroups, error) {
	mounts, err := cgroupMounts()
	if err != nil && want != "none" {
		return nil, err
	}
	try := []CgroupMode{CgroupV2, CgroupV1}
	switch want {
	case "", "auto":
	case "v1":
		try = []CgroupMode{CgroupV1}
	case "v2":
		try = []CgroupMode{CgroupV2}
	case "none":
		return &cgroups{mode: CgroupNone}, nil
	default:
		return nil, fmt.Errorf("unknown cgroup mode %q (want auto, v1, v2 or none)", want)
	}
	var errs []error
	for _, mode := range try {
		var cg *cgroups
		var err error
		if mode == CgroupV2 {
			cg, err = setupV2(mounts)
		} else {
			cg, err = setupV1(mounts)
		}
		if err == nil && total > 0 {
			err = cg.limitAll(total)
		}
		if err == nil {
			// Prove it works before relying on it: a cgroup with the real limits, a process started inside it
			// the way jails will be (clone3 may be refused where v2 is not), and the cgroup removed.
			var j *jailCgroup
			if j, err = cg.create("probe-"+strconv.Itoa(os.Getpid()), l); err == nil {
				cmd := exec.Command(probe, "--help")
				if err = j.start(cmd, false, nil); err == nil {
					_ = cmd.Wait()
				}
				if rerr := j.remove(); err == nil {
					err = rerr
				}
			}
		}
		if err == nil {
			return cg, nil
		}
		if cg != nil {
			cg.close()
		}
		errs = append(errs, fmt.Errorf("%s: %w", mode, err))
	}
	if want == "auto" || want == "" {
		return &cgroups{mode: CgroupNone}, errors.Join(errs...)
	}
	return nil, errors.Join(errs...)
}

type cgroupMount struct {
	fstype string
	dir    string
	opts   map[string]bool
}

func cgroupMounts() ([]cgroupMount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []cgroupMount
	sc := bufio.NewScanner(f)
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
		m := cgroupMount{fstype: qf[0], dir: pf[4], opts: map[string]bool{}}
		for _, o := range strings.Split(qf[2], ",") {
			m.opts[o] = true
		}
		out = append(out, m)
	}
	return out, sc.Err()
}

// ownCgroups maps controller (or "" for v2) to this process's path in that hierarchy.
func ownCgroups() (map[string]string, error) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
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
	return out, nil
}

func setupV1(mounts []cgroupMount) (*cgroups, error) {
	own, err := ownCgroups()
	if err != nil {
		return nil, err
	}
	cg := &cgroups{mode: CgroupV1, v1: map[string]string{}, v1home: map[string]string{}}
	for _, ctrl := range v1Controllers {
		for _, m := range mounts {
			if m.fstype == "cgroup" && m.opts[ctrl] {
				home := filepath.Join(m.dir, own[ctrl])
				if _, err := os.Stat(home); err != nil {
					home = m.dir // inside a cgroup namespace the path may be relative to the mount already
				}
				cg.v1home[ctrl] = home
				break
			}
		}
		if cg.v1home[ctrl] == "" {
			return nil, fmt.Errorf("no cgroup v1 %s controller is mounted", ctrl)
		}
	}
	name := runnerDir()
	for _, ctrl := range v1Controllers {
		safepy := filepath.Join(cg.v1home[ctrl], "safepy")
		removeStale(safepy)
		cg.v1[ctrl] = filepath.Join(safepy, name)
		if err := os.MkdirAll(cg.v1[ctrl], 0o755); err != nil {
			cg.close()
			return nil, err
		}
	}
	return cg, nil
}

func setupV2(mounts []cgroupMount) (*cgroups, error) {
	var root string
	for _, m := range mounts {
		if m.fstype == "cgroup2" {
			root = m.dir
			break
		}
	}
	if root == "" {
		return nil, errors.New("no cgroup2 file system is mounted")
	}
	own, err := ownCgroups()
	if err != nil {
		return nil, err
	}
	home := filepath.Join(root, own[""])
	if _, err := os.Stat(filepath.Join(home, "cgroup.controllers")); err != nil {
		home = root // inside a cgroup namespace the path may be relative to the mount already
	}
	// Touch nothing unless the controllers the jail needs are delegated to this cgroup. (On a hybrid host the
	// cgroup2 mount holds no controllers at all; v1 is the hierarchy to use there.)
	have, err := os.ReadFile(filepath.Join(home, "cgroup.controllers"))
	if err != nil {
		return nil, err
	}
	for _, c := range []string{"memory", "pids", "cpu"} {
		if !slices.Contains(strings.Fields(string(have)), c) {
			return nil, fmt.Errorf("the %s controller is not available in %s (it has %q)", c, home, strings.TrimSpace(string(have)))
		}
	}
	const want = "+memory +pids +cpu"
	if err := writeFile(filepath.Join(home, "cgroup.subtree_control"), want); err != nil {
		// cgroup v2 lets a cgroup other than the root either hold processes or hand controllers to children
		// (the "no internal processes" rule). This process's cgroup is its own (a container's, or a service's
		// delegated subtree) but holds processes, this one and maybe an init or a shell that started it: move
		// them all into a leaf, as a container's init does, and put back what moved on failure.
		if !errors.Is(err, syscall.EBUSY) {
			return nil, fmt.Errorf("enabling controllers in %s: %w", home, err)
		}
		leaf := filepath.Join(home, "safepy-server")
		created := os.Mkdir(leaf, 0o755) == nil
		moved, err := moveProcesses(home, leaf)
		if err == nil {
			err = writeFile(filepath.Join(home, "cgroup.subtree_control"), want)
		}
		if err != nil {
			for _, pid := range moved {
				_ = writeFile(filepath.Join(home, "cgroup.procs"), pid)
			}
			if created {
				os.Remove(leaf)
			}
			return nil, fmt.Errorf("moving the processes of %s into %s to enable its controllers: %w", home, leaf, err)
		}
	}
	safepy := filepath.Join(home, "safepy")
	if err := os.MkdirAll(safepy, 0o755); err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(safepy, "cgroup.subtree_control"), want); err != nil {
		return nil, fmt.Errorf("enabling controllers in %s: %w", safepy, err)
	}
	removeStale(safepy)
	base := filepath.Join(safepy, runnerDir())
	if err := os.Mkdir(base, 0o755); err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(base, "cgroup.subtree_control"), want); err != nil {
		os.Remove(base)
		return nil, fmt.Errorf("enabling controllers in %s: %w", base, err)
	}
	return &cgroups{mode: CgroupV2, v2: base}, nil
}

// moveProcesses moves every process of the cgroup from into the cgroup to, this one first, until from holds none
// (a process may fork meanwhile). Processes that exit meanwhile are skipped.
func moveProcesses(from, to string) (moved []string, err error) {
	self := strconv.Itoa(os.Getpid())
	if err := writeFile(filepath.Join(to, "cgroup.procs"), self); err != nil {
		return nil, err
	}
	moved = append(moved, self)
	for range 100 {
		data, err := os.ReadFile(filepath.Join(from, "cgroup.procs"))
		if err != nil {
			return moved, err
		}
		pids := strings.Fields(string(data))
		if len(pids) == 0 {
			return moved, nil
		}
		for _, pid := range pids {
			if err := writeFile(filepath.Join(to, "cgroup.procs"), pid); err == nil {
				moved = append(moved, pid)
			} else if !errors.Is(err, syscall.ESRCH) {
				return moved, err
			}
		}
	}
	return moved, fmt.Errorf("%s keeps gaining processes", from)
}

// limitAll caps the memory of all jails together, so that a full house of scripts at their limits cannot push
// the whole container into the OOM killer: past the cap, the kernel kills within the jails.
func (c *cgroups) limitAll(total int64) error {
	v := strconv.FormatInt(total, 10)
	if c.mode == CgroupV2 {
		return writeFile(filepath.Join(c.v2, "memory.max"), v)
	}
	return writeFile(filepath.Join(c.v1["memory"], "memory.limit_in_bytes"), v)
}

// jailCgroup is the cgroup of one jail: one directory per controller on v1, one directory on v2.
type jailCgroup struct {
	mode CgroupMode
	dirs map[string]string // controller -> directory (v2: "" -> directory)
	home map[string]string // v1: controller -> this process's own cgroup
}

func (c *cgroups) create(id string, l Limits) (*jailCgroup, error) {
	j := &jailCgroup{mode: c.mode, dirs: map[string]string{}, home: c.v1home}
	var settings [][2]string
	switch c.mode {
	case CgroupNone:
		return nil, nil
	case CgroupV1:
		for ctrl, base := range c.v1 {
			j.dirs[ctrl] = filepath.Join(base, id)
		}
		period := int64(100000)
		settings = [][2]string{
			{j.dirs["memory"] + "/memory.limit_in_bytes", strconv.FormatInt(l.MemoryBytes, 10)},
			{j.dirs["memory"] + "/memory.swappiness", "0"},
			{j.dirs["memory"] + "/memory.memsw.limit_in_bytes", strconv.FormatInt(l.MemoryBytes, 10)},
			{j.dirs["pids"] + "/pids.max", strconv.FormatInt(l.Processes+jailOverheadTasks, 10)},
			{j.dirs["cpu"] + "/cpu.cfs_period_us", strconv.FormatInt(period, 10)},
			{j.dirs["cpu"] + "/cpu.cfs_quota_us", strconv.FormatInt(period*l.CPUMsPerSec/1000, 10)},
		}
	case CgroupV2:
		dir := filepath.Join(c.v2, id)
		j.dirs[""] = dir
		settings = [][2]string{
			{dir + "/memory.max", strconv.FormatInt(l.MemoryBytes, 10)},
			{dir + "/memory.swap.max", "0"},
			{dir + "/pids.max", strconv.FormatInt(l.Processes+jailOverheadTasks, 10)},
			{dir + "/cpu.max", fmt.Sprintf("%d 100000", 100*l.CPUMsPerSec)},
		}
	}
	for _, dir := range j.dirs {
		if err := os.Mkdir(dir, 0o755); err != nil {
			_ = j.remove()
			return nil, err
		}
	}
	for _, s := range settings {
		if err := writeFile(s[0], s[1]); err != nil {
			optional := strings.HasSuffix(s[0], "swap.max") || strings.HasSuffix(s[0], "swappiness") ||
				strings.HasSuffix(s[0], "memsw.limit_in_bytes")
			if optional && (errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrInvalid)) {
				continue // no swap accounting on this kernel: there is no swap to limit
			}
			_ = j.remove()
			return nil, fmt.Errorf("setting %s: %w", s[0], err)
		}
	}
	return j, nil
}

// start starts cmd so that its first process, and so everything it forks, is born inside the cgroup: there is no
// moment in which a jailed process runs outside its limits. With freshClocks, it is also born in a time namespace
// of its own whose clocks start now (clocks.go).
//
// It forks from an OS thread locked for the purpose. cgroup v1 places threads, not processes: the thread moves into
// the jail's cgroups, forks, and moves back. A time namespace cannot be left by a thread of a process that has
// others: that thread is thrown away (the runtime ends a thread whose goroutine exits locked; the main thread it
// only parks), but not before ended is closed: a child's parent-death signal (Pdeathsig) follows the thread that
// forked it, not the process. The Go runtime never clones a new thread from a locked one, so nothing else follows
// the thread.
func (j *jailCgroup) start(cmd *exec.Cmd, freshClocks bool, ended <-chan struct{}) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		reusable, err := j.startHere(cmd, freshClocks)
		done <- err
		if reusable {
			runtime.UnlockOSThread()
		} else if err == nil {
			<-ended
		}
	}()
	return <-done
}

// startHere is start on the calling, locked thread; it reports whether the thread is as it was.
func (j *jailCgroup) startHere(cmd *exec.Cmd, freshClocks bool) (reusable bool, err error) {
	if freshClocks {
		if err := freshTimeNamespace(); err != nil {
			return false, err
		}
	}
	switch {
	case j == nil:
		return !freshClocks, cmd.Start()
	case j.mode == CgroupV2:
		fd, err := syscall.Open(j.dirs[""], syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return !freshClocks, err
		}
		defer syscall.Close(fd)
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
		return !freshClocks, cmd.Start()
	}
	tid := strconv.Itoa(syscall.Gettid())
	move := func(dirs map[string]string) error {
		for _, ctrl := range v1Controllers {
			if err := writeFile(filepath.Join(dirs[ctrl], "tasks"), tid); err != nil {
				return err
			}
		}
		return nil
	}
	if err = move(j.dirs); err == nil {
		err = cmd.Start()
	}
	// Back home, or the thread stays where it is and is thrown away.
	return move(j.home) == nil && !freshClocks, err
}

// procsFiles opens the cgroup's cgroup.procs files for writing, one per hierarchy: a process that is handed them
// can move itself in (the kernel checks the credentials of whoever opened the file, here root).
func (j *jailCgroup) procsFiles() ([]*os.File, error) {
	var out []*os.File
	for _, dir := range j.dirs {
		f, err := os.OpenFile(filepath.Join(dir, "cgroup.procs"), os.O_WRONLY, 0)
		if err != nil {
			closeFiles(out)
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}

// memoryPeak is the most the cgroup has held.
func (j *jailCgroup) memoryPeak() int64 {
	return j.memoryFile("memory.peak", "memory.max_usage_in_bytes")
}

// memoryUsage is what the cgroup holds now.
func (j *jailCgroup) memoryUsage() int64 {
	return j.memoryFile("memory.current", "memory.usage_in_bytes")
}

// memoryHeld is what the cgroup holds now that the kernel would not reclaim for another cgroup's need: its usage
// less the page cache of files and (v2) the reclaimable kernel caches (dentries, inodes). Those are charged to
// whichever cgroup read a file first, which for the libraries every jail maps is a fork server, and a cold jail
// that finds them cached pays nothing for them; it is no part of a jail's share of its fork server.
func (j *jailCgroup) memoryHeld() int64 {
	if j == nil {
		return 0
	}
	stat := filepath.Join(j.dirs[""], "memory.stat")
	file := "file"
	if j.mode == CgroupV1 {
		stat, file = filepath.Join(j.dirs["memory"], "memory.stat"), "cache"
	}
	// tmpfs pages are counted as files, and are not reclaimed (without swap).
	reclaimable := counter(stat, file) - counter(stat, "shmem") + counter(stat, "slab_reclaimable")
	return j.memoryUsage() - max(reclaimable, 0)
}

// memoryFile reads a number from the cgroup's memory controller: v2's file or v1's; 0 if it cannot.
func (j *jailCgroup) memoryFile(v2, v1 string) int64 {
	if j == nil {
		return 0
	}
	path := filepath.Join(j.dirs[""], v2)
	if j.mode == CgroupV1 {
		path = filepath.Join(j.dirs["memory"], v1)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(data)), 10, 64)
	return n
}

// signalAll sends SIGKILL to every process in the cgroup, once, without waiting for them to die.
func (j *jailCgroup) signalAll() (left bool) {
	if j == nil {
		return false
	}
	if j.mode == CgroupV2 {
		_ = writeFile(filepath.Join(j.dirs[""], "cgroup.kill"), "1") // kernels since 5.14; the pids below cover older ones
	}
	return j.signal(unix.SIGKILL, false, nil)
}

// stopAll stops every process in the cgroup: none of them runs again, and none of them exits yet (see
// killInTurn). It returns once every process is stopped or has a SIGSTOP pending at the same moment, so that none
// is left running to wake another (SIGCONT cancels a pending stop) or to fork a new one (a fork fails while a
// signal is pending); a cgroup that does not come to rest within a bound is killed instead. A pending stop takes
// effect before the process runs another instruction of its own, so the answer need not wait for the kernel to
// schedule every process of the jail once.
func (j *jailCgroup) stopAll() {
	if j == nil {
		return
	}
	for i := 0; i < 200; i++ {
		if !j.signal(unix.SIGSTOP, false, stopping) {
			return
		}
		if i >= 2 {
			time.Sleep(50 * time.Microsecond)
		}
	}
	j.signalAll()
}

// killInTurn kills the cgroup's processes one at a time, each gone before the next is killed. A process forked
// from a fork server shares its page tables' worth of the fork server's memory, and taking that down is
// milliseconds of the kernel's CPU time: one at a time, it never takes both CPUs of a small machine from the server
// answering meanwhile. killAll remains the backstop.
func (j *jailCgroup) killInTurn() {
	for i := 0; i < 64 && j != nil && j.signal(unix.SIGKILL, true, tasksIn("ZX")); i++ {
	}
}

// signal sends sig to every process in the cgroup but those skip reports (with one, to the first, and waits up to
// a second for its end), and reports whether it found any.
func (j *jailCgroup) signal(sig unix.Signal, one bool, skip func(pid int) bool) (found bool) {
	for _, dir := range j.dirs {
		data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(data)) {
			pid, err := strconv.Atoi(f)
			if err != nil || pid <= 0 || pid == os.Getpid() || skip != nil && skip(pid) {
				continue
			}
			found = true
			if signalIfIn(pid, dir, sig, one) && one {
				return true
			}
		}
	}
	return found
}

// tasksIn returns a test of whether every thread of a process is in one of the states (as /proc/PID/task/TID/stat
// has them), or gone. Every thread, not the process's own /proc/PID/stat: that one is the main thread's, which
// shows Z once the main thread has ended, while the process's other threads still run.
func tasksIn(states string) func(pid int) bool {
	return func(pid int) bool {
		dir := "/proc/" + strconv.Itoa(pid) + "/task"
		tids, err := os.ReadDir(dir)
		if err != nil {
			return true
		}
		for _, tid := range tids {
			stat, err := os.ReadFile(dir + "/" + tid.Name() + "/stat")
			if err != nil {
				continue // ended
			}
			i := bytes.LastIndexByte(stat, ')') // the command's name may hold anything, a ')' too
			if i >= 0 && i+2 < len(stat) && strings.IndexByte(states, stat[i+2]) < 0 {
				return false
			}
		}
		return true
	}
}

// stopping reports whether a process has a SIGSTOP pending (for the whole process: it takes effect in every
// thread before that thread runs another instruction of its own), or every thread of it is stopped or ended.
func stopping(pid int) bool {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return true
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "ShdPnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err == nil && mask&(1<<(unix.SIGSTOP-1)) != 0 {
				return true
			}
			break
		}
	}
	return tasksIn("TtZX")(pid)
}

// killAll kills every process left in the cgroup and waits until it is empty.
func (j *jailCgroup) killAll() {
	for i := 0; i < 2000 && j.signalAll(); i++ {
		time.Sleep(time.Millisecond)
	}
}

// signalIfIn sends sig to pid if it is still in the cgroup dir, and reports whether it did; with wait, it then
// waits up to a second for the process to end. A pidfd pins the process, so a pid that was reused after the
// cgroup listed it is never signalled: the check runs on the process the pidfd holds.
func signalIfIn(pid int, dir string, sig unix.Signal, wait bool) bool {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return false // gone already
	}
	defer unix.Close(fd)
	rel := "/safepy/" + filepath.Base(filepath.Dir(dir)) + "/" + filepath.Base(dir) + "\n" // how /proc/PID/cgroup ends the jail's path
	// The process's own file is its main thread's; one whose main thread has ended may not show the cgroup its
	// other threads still run in: any thread of it in the jail's cgroup counts.
	in := func(file string) bool {
		data, err := os.ReadFile(file)
		return err == nil && strings.Contains(string(data), rel)
	}
	if !in("/proc/" + strconv.Itoa(pid) + "/cgroup") {
		threads, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/cgroup") // only then: off the common path
		if !slices.ContainsFunc(threads, in) {
			return false
		}
	}
	if unix.PidfdSendSignal(fd, sig, nil, 0) != nil {
		return false
	}
	if wait {
		_, _ = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 1000) // readable once it has ended
	}
	return true
}

// events reports whether the OOM killer ran in the cgroup and whether a fork was refused by its process limit.
func (j *jailCgroup) events() (oomKilled, pidsMax bool) {
	if j == nil {
		return false, false
	}
	memFile, pidsFile := filepath.Join(j.dirs[""], "memory.events"), filepath.Join(j.dirs[""], "pids.events")
	if j.mode == CgroupV1 {
		memFile, pidsFile = filepath.Join(j.dirs["memory"], "memory.oom_control"), filepath.Join(j.dirs["pids"], "pids.events")
	}
	return counter(memFile, "oom_kill") > 0, counter(pidsFile, "max") > 0
}

func counter(path, key string) int64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == key {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}

// remove kills what is left and removes the cgroup's directories.
func (j *jailCgroup) remove() error {
	if j == nil {
		return nil
	}
	j.killAll()
	var errs []error
	for _, dir := range j.dirs {
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
