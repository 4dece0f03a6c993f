// Package reap signals, stops and kills the processes of a group (a jail's cgroup) that it can list but that are
// not its children: pids it reads may be reused at any moment, and the group may fork while it works.
package reap

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Group is a set of processes: a jail's cgroup.
type Group interface {
	// Procs lists the group's processes; a pid may be listed more than once, or be gone already.
	Procs() []int
	// Contains reports whether any thread of pid is in the group.
	Contains(pid int) bool
	// Kill kills every process at once where the group can; the signals sent after it cover the rest.
	Kill()
}

// Signal sends sig to every process in the group, and reports whether it found any.
func Signal(g Group, sig unix.Signal) (found bool) { return signal(g, sig, false, nil) }

// SignalAll sends SIGKILL to every process in the group, once, without waiting for them to die.
func SignalAll(g Group) (left bool) {
	g.Kill()
	return signal(g, unix.SIGKILL, false, nil)
}

// KillAll kills every process left in the group and waits until it is empty.
func KillAll(g Group) {
	for i := 0; i < 2000 && SignalAll(g); i++ {
		time.Sleep(time.Millisecond)
	}
}

// Stop stops every process in the group: none of them runs again, and none of them exits yet (see KillInTurn).
// It returns once every process is stopped or has a SIGSTOP pending at the same moment, so that none is left
// running to wake another (SIGCONT cancels a pending stop) or to fork a new one (a fork fails while a signal is
// pending); a group that does not come to rest within a bound is killed instead. A pending stop takes effect
// before the process runs another instruction of its own, so the answer need not wait for the kernel to schedule
// every process of the jail once.
func Stop(g Group) {
	for i := 0; i < 200; i++ {
		if !signal(g, unix.SIGSTOP, false, stopping) {
			return
		}
		if i >= 2 {
			time.Sleep(50 * time.Microsecond)
		}
	}
	SignalAll(g)
}

// KillInTurn kills the group's processes one at a time, each gone before the next is killed. A process forked
// from a fork server shares its page tables' worth of the fork server's memory, and taking that down is
// milliseconds of the kernel's CPU time: one at a time, it never takes both CPUs of a small machine from the server
// answering meanwhile. KillAll remains the backstop.
func KillInTurn(g Group) {
	for i := 0; i < 64 && signal(g, unix.SIGKILL, true, tasksIn("ZX")); i++ {
	}
}

// signal sends sig to every process in the group but those skip reports (with one, to the first, and waits up to
// a second for its end), and reports whether it found any.
func signal(g Group, sig unix.Signal, one bool, skip func(pid int) bool) (found bool) {
	for _, pid := range g.Procs() {
		if pid <= 0 || pid == os.Getpid() || skip != nil && skip(pid) {
			continue
		}
		found = true
		if signalIfIn(g, pid, sig, one) && one {
			return true
		}
	}
	return found
}

// signalIfIn sends sig to pid if it is still in the group, and reports whether it did; with wait, it then waits up
// to a second for the process to end. A pidfd pins the process, so a pid that was reused after the group listed it
// is never signalled: the check runs on the process the pidfd holds.
func signalIfIn(g Group, pid int, sig unix.Signal, wait bool) bool {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return false // gone already
	}
	defer unix.Close(fd)
	if !g.Contains(pid) || unix.PidfdSendSignal(fd, sig, nil, 0) != nil {
		return false
	}
	if wait {
		_, _ = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 1000) // readable once it has ended
	}
	return true
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
			if !stateIn(stat, states) {
				return false
			}
		}
		return true
	}
}

// stateIn reports whether a /proc stat line's state is one of states (a line it cannot read counts as in).
func stateIn(stat []byte, states string) bool {
	i := bytes.LastIndexByte(stat, ')') // the command's name may hold anything, a ')' too
	return i < 0 || i+2 >= len(stat) || strings.IndexByte(states, stat[i+2]) >= 0
}

// stopping reports whether a process has a SIGSTOP pending (for the whole process: it takes effect in every
// thread before that thread runs another instruction of its own), or every thread of it is stopped or ended.
func stopping(pid int) bool {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return true
	}
	if stopPending(status) {
		return true
	}
	return tasksIn("TtZX")(pid)
}

// stopPending reports whether a /proc/PID/status's shared pending signals hold SIGSTOP.
func stopPending(status []byte) bool {
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "ShdPnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && mask&(1<<(unix.SIGSTOP-1)) != 0
		}
	}
	return false
}
