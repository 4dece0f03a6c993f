package sandbox

import (
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/safe-py/safepy/internal/cgroup"
	"github.com/safe-py/safepy/internal/reap"
	"golang.org/x/sys/unix"
)

//go:embed forkserver.py
var forkServerSource []byte

// Fork servers take the cost of starting Python and importing numpy and pandas off every request: one long-lived
// jail per preload set imports its modules once, then forks a child per request, which builds that request's jail
// around itself (forkserver.py) in ~10 ms instead of the ~300 ms a cold jail with pandas takes. Every request
// still gets fresh namespaces, its own cgroup with the same limits, its own /proc, /sandbox, /tmp and /dev/shm, a
// uid of its own, no capabilities, no_new_privs and the cold jail's own seccomp filter.
//
// A fork server is replaced after a maximum age or number of forks (its children share its address-space layout
// and hash seed), and when it dies; meanwhile requests go the cold way. Because a fork server is the init of the
// PID namespace its children's supervisors live in, one is closed only once its children are all gone.

// forking is a runner's fork servers, one per preload set.
type forking struct {
	r        *parts
	args     []string // nsjail's command line for a fork server, less the uid and the command's configuration
	serverJS []byte   // the fork servers' configuration (forkserver.py's argv), less the preload set
	slots    []*forkSlot
	maxAge   time.Duration
	maxForks int64
	wg       sync.WaitGroup // replacements being started
	servers  sync.WaitGroup // every fork server started, until it is gone and all it held released (forkServer.end)
	closed   atomic.Bool
}

// forkSlot holds the fork server of one preload set, and its replacement while that starts.
type forkSlot struct {
	f       *forking
	preload []string

	mu       sync.Mutex
	cur      *forkServer // nil while none is ready: requests go the cold way
	starting bool
	failures int
}

// forkServer is one fork server: an nsjail process, its cgroup, and the control socket it receives requests on.
type forkServer struct {
	slot *forkSlot
	cmd  *exec.Cmd
	cg   cgroup.Cgroup
	ctl  *net.UnixConn
	logs *stream
	// share is what of the fork server a forked jail holds without holding it in its own cgroup, and what it
	// copies of it (forkedLimits).
	share forkShare
	born  time.Time
	done  chan struct{} // closed when nsjail has exited
	gone  chan struct{} // closed when all it held is released, after done

	mu       sync.Mutex
	forks    int64
	inflight int // children not yet released
	retiring bool
	closing  bool
}

// forkServerSettings are the fork servers' limits on their own life.
type forkServerSettings struct {
	MaxAge   time.Duration
	MaxForks int64
}

// onlyChild is the pid of the one child of process pid (nsjail's is the jail's init).
func onlyChild(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return 0, err
	}
	var kids []int
	for _, f := range strings.Fields(string(data)) {
		if n, err := strconv.Atoi(f); err == nil {
			kids = append(kids, n)
		}
	}
	if len(kids) != 1 {
		return 0, fmt.Errorf("process %d has children %v, want one", pid, kids)
	}
	return kids[0], nil
}

// server returns the fork server for preload, or nil if none is ready (the request goes cold). One that reached
// its age or fork limit still serves until its replacement is ready.
func (f *forking) server(preload []string) *forkServer {
	if f == nil || f.closed.Load() {
		return nil
	}
	s := f.slots[min(len(preload), len(f.slots)-1)]
	s.mu.Lock()
	defer s.mu.Unlock()
	fs := s.cur
	if fs != nil && !fs.alive() {
		s.cur, fs = nil, nil
	}
	if fs == nil || time.Since(fs.born) > f.maxAge || fs.forkCount() >= f.maxForks {
		s.replaceLocked()
	}
	return fs
}

// replaceLocked starts a new fork server in the background, once at a time, backing off after failures.
func (s *forkSlot) replaceLocked() {
	if s.starting || s.f.closed.Load() {
		return
	}
	s.starting = true
	delay := time.Duration(0)
	if s.failures > 0 {
		delay = min(time.Duration(1<<min(s.failures, 6))*100*time.Millisecond, 10*time.Second)
	}
	s.f.wg.Add(1)
	go func() {
		defer s.f.wg.Done()
		time.Sleep(delay)
		if s.f.closed.Load() {
			s.mu.Lock()
			s.starting = false
			s.mu.Unlock()
			return
		}
		fs, err := s.start()
		s.mu.Lock()
		s.starting = false
		if err != nil || s.f.closed.Load() {
			s.failures++
			s.mu.Unlock()
			if fs != nil {
				fs.kill()
			}
			if err != nil {
				s.f.r.cfg.Log.Warn("a fork server could not be started; its requests go the cold way", "preload", s.preload, "error", err.Error())
			}
			return
		}
		s.failures = 0
		old := s.cur
		s.cur = fs
		s.mu.Unlock()
		if old != nil {
			old.retire()
		}
	}()
}

// start starts a fork server and waits until its modules are in.
func (s *forkSlot) start() (*forkServer, error) {
	r := s.f.r
	cg, err := r.cgroups.Create("fork-"+newID(), cgroupLimits(r.limits))
	if err != nil {
		return nil, fmt.Errorf("creating the fork server's cgroup: %w", err)
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		dropCgroup(cg)
		return nil, err
	}
	ours, theirs := os.NewFile(uintptr(pair[0]), "control"), os.NewFile(uintptr(pair[1]), "control")
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		theirs.Close()
		dropCgroup(cg)
		return nil, err
	}
	logR, logW, err := os.Pipe()
	if err != nil {
		theirs.Close()
		conn.Close()
		dropCgroup(cg)
		return nil, err
	}
	js, _ := json.Marshal(map[string]any{"preload": s.preload, "plan": json.RawMessage(s.f.serverJS)})
	args := append(append([]string{}, s.f.args...), "--", "/usr/local/bin/python3", "-I", "-u", "/safepy/forkserver.py", string(js))
	fs := &forkServer{slot: s, cg: cg, ctl: conn.(*net.UnixConn), done: make(chan struct{}), gone: make(chan struct{})}
	fs.cmd = exec.Command(r.cfg.Nsjail, args...)
	fs.cmd.Env = []string{}
	fs.cmd.Stdout, fs.cmd.Stderr = logW, logW
	fs.cmd.ExtraFiles = []*os.File{theirs, logW} // 3: the control socket, 4: nsjail's log
	fs.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = cg.Start(fs.cmd, nil, fs.done)
	logW.Close()
	theirs.Close() // the fork server's alone now: if it dies, reading the control socket ends
	if err != nil {
		logR.Close()
		fs.ctl.Close()
		dropCgroup(cg)
		return nil, fmt.Errorf("starting the fork server: %w", err)
	}
	fs.logs = captureAsync(logR, 64<<10)
	s.f.servers.Add(1)
	go func() {
		fs.cmd.Wait()
		close(fs.done)
		// However it ended (closed, replaced, killed, OOM-killed, crashed), what it held goes at once, and a
		// fork server that was serving is replaced; its children's jails, which its death took down, finish on
		// their own.
		fs.end()
		s.lost(fs)
	}()
	fs.ctl.SetReadDeadline(time.Now().Add(r.cfg.StartupTimeout + 30*time.Second))
	ready := make([]byte, 4096)
	n, err := fs.ctl.Read(ready)
	var report struct {
		PrefaultBytes int64 `json:"prefault_bytes"`
		CopiedBytes   int64 `json:"copied_bytes"`
	}
	if n < 1 || ready[0] != 'R' || json.Unmarshal(ready[1:n], &report) != nil {
		fs.kill()
		logs, _ := fs.logs.now()
		return nil, fmt.Errorf("the fork server did not come up (%v): %s%s", err, firstLines(logs, 4), hint(logs))
	}
	fs.ctl.SetReadDeadline(time.Time{})
	fs.share.base = cg.MemoryHeld()
	// The training child ran in this cgroup and has exited: what the cgroup held at its most beyond what it holds
	// now is what the child was charged, everything included (its copies, its new pages, its copy of the page
	// tables). The child's pagemap tells its copies on most kernels, and fewer on others (7.2 in the cgroup-v2
	// guest: a plot's 10.8 MiB of 14.4); the charge, less the new pages, is the floor the kernel itself says.
	charged := cg.MemoryPeak() - cg.MemoryUsage()
	fresh := report.PrefaultBytes - report.CopiedBytes // written pages that were not the fork server's
	fs.share.copies = max(report.CopiedBytes, charged-fresh)
	fs.share.prefault = max(report.PrefaultBytes, charged)
	fs.born = time.Now()
	return fs, nil
}

func (fs *forkServer) alive() bool {
	select {
	case <-fs.done:
		return false
	default:
		return true
	}
}

func (fs *forkServer) forkCount() int64 {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.forks
}

// fork asks the fork server for a child with the request's descriptors and cgroup, running as uid outside; with
// prefault, the child copies ahead of time what its fork server learned a typical script writes.
func (fs *forkServer) fork(uid int, prefault bool, files []*os.File) error {
	fs.mu.Lock()
	if fs.retiring || !fs.alive() {
		fs.mu.Unlock()
		return errors.New("the fork server is retiring")
	}
	fs.inflight++
	fs.forks++
	fs.mu.Unlock()
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	msg, _ := json.Marshal(map[string]any{"uid": jailUID + uid - fs.slot.f.r.uids.Base, "prefault": prefault})
	if _, _, err := fs.ctl.WriteMsgUnix(msg, unix.UnixRights(fds...), nil); err != nil {
		fs.released()
		return fmt.Errorf("sending a request to the fork server: %w", err)
	}
	return nil
}

// released is called once a child's jail is gone; a retiring fork server closes after its last.
func (fs *forkServer) released() {
	fs.mu.Lock()
	fs.inflight--
	last := fs.retiring && fs.inflight == 0
	fs.mu.Unlock()
	if last {
		fs.close()
	}
}

// retire takes the fork server out of service; it closes once its children are gone.
func (fs *forkServer) retire() {
	fs.mu.Lock()
	fs.retiring = true
	idle := fs.inflight == 0
	fs.mu.Unlock()
	if idle {
		fs.close()
	}
}

// close ends the fork server: it exits when its control socket closes; what is left is killed. It returns once
// all the fork server held is released.
func (fs *forkServer) close() {
	fs.mu.Lock()
	if fs.closing {
		fs.mu.Unlock()
		<-fs.gone
		return
	}
	fs.closing = true
	fs.mu.Unlock()
	fs.ctl.Close()
	select {
	case <-fs.done:
	case <-time.After(5 * time.Second):
	}
	fs.kill()
}

// kill kills the fork server and returns once all it held is released.
func (fs *forkServer) kill() {
	fs.ctl.Close()
	reap.KillAll(fs.cg)
	if fs.cmd.Process != nil {
		fs.cmd.Process.Kill()
	}
	<-fs.gone
}

// end releases what the fork server held once its nsjail has exited: what is left in its cgroup (every
// hierarchy), the cgroup, its control socket and its log pipe. Called once, by the goroutine that saw it exit.
func (fs *forkServer) end() {
	defer fs.slot.f.servers.Done()
	defer close(fs.gone)
	fs.mu.Lock()
	fs.retiring = true // no more forks: a request that finds it now goes the cold way
	fs.mu.Unlock()
	fs.ctl.Close()
	reap.KillAll(fs.cg)
	// The log pipe ends once the last process that held it is gone; it is closed after a moment all the same, so
	// that nothing that may still hold the other end keeps it (what it said is read first: the start-up's error).
	select {
	case <-fs.logs.done:
	case <-time.After(time.Second):
	}
	fs.logs.f.Close()
	<-fs.logs.done
	if err := dropCgroup(fs.cg); err != nil {
		fs.slot.f.r.cfg.Log.Warn("a fork server's cgroup could not be removed", "error", err.Error())
	}
}

// lost takes a fork server that ended out of service, and starts its replacement if it was the one serving.
func (s *forkSlot) lost(fs *forkServer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == fs {
		s.cur = nil
		s.replaceLocked()
	}
}

// close stops replacing fork servers, closes the serving ones (each once its children are gone, which Close has
// ended), and returns once every fork server it ever started, dead or alive, is gone with all it held.
func (f *forking) close() {
	if f == nil {
		return
	}
	f.closed.Store(true)
	for _, s := range f.slots {
		// A replacement is begun with the slot's lock held, so once it is taken here, no new one can begin.
		s.mu.Lock()
		fs := s.cur
		s.cur = nil
		s.mu.Unlock()
		if fs != nil {
			fs.retire()
		}
	}
	f.wg.Wait() // replacements that began before: they see the runner closed and end what they started
	f.servers.Wait()
}

// ready reports whether every preload set has a fork server serving.
func (f *forking) ready() bool {
	if f == nil {
		return false
	}
	for _, s := range f.slots {
		s.mu.Lock()
		ok := s.cur != nil && s.cur.alive()
		s.mu.Unlock()
		if !ok {
			return false
		}
	}
	return true
}
