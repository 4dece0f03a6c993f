// Package proctree lists the processes that descend from a process, read from /proc. Tests use it to count what
// a server under test left behind, whatever else runs on the machine: only its own process tree counts.
package proctree

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Proc is one process.
type Proc struct {
	PID     int
	PPID    int
	State   string // R, S, D, Z...
	Cmdline string // arguments joined by spaces
	UID     int    // real uid, as the host sees it
}

// Live reports whether the process has not exited: a zombie is dead, only not yet reaped.
func (p Proc) Live() bool { return p.State != "Z" && p.State != "X" }

// Descendants returns the processes below pid (children, their children...), not pid itself.
func Descendants(pid int) []Proc {
	all := list()
	children := map[int][]Proc{}
	for _, p := range all {
		children[p.PPID] = append(children[p.PPID], p)
	}
	var out []Proc
	queue := []int{pid}
	for len(queue) > 0 {
		for _, c := range children[queue[0]] {
			out = append(out, c)
			queue = append(queue, c.PID)
		}
		queue = queue[1:]
	}
	return out
}

// Live returns the live processes below pid whose command line contains s (all of them if s is empty).
func Live(pid int, s string) []Proc {
	var out []Proc
	for _, p := range Descendants(pid) {
		if p.Live() && strings.Contains(p.Cmdline, s) {
			out = append(out, p)
		}
	}
	return out
}

// BecomeSubreaper makes the calling process adopt the orphans of its descendants, so that a process a server
// left behind stays in the test's tree (and is counted) after the server itself has exited.
func BecomeSubreaper() error {
	return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
}

func list() []Proc {
	entries, _ := os.ReadDir("/proc")
	var out []Proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses, so parse from the last ')'.
		i := strings.LastIndexByte(string(stat), ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		p := Proc{PID: pid, PPID: ppid, State: f[0], UID: -1}
		if cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil {
			p.Cmdline = strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " "))
		}
		if status, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status")); err == nil {
			for _, line := range strings.Split(string(status), "\n") {
				if v, ok := strings.CutPrefix(line, "Uid:"); ok {
					if fs := strings.Fields(v); len(fs) > 0 {
						p.UID, _ = strconv.Atoi(fs[0])
					}
					break
				}
			}
		}
		out = append(out, p)
	}
	return out
}
