package cgroup

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// v2Manager is a runner's cgroup on v2: one directory, under which each jail gets a child.
type v2Manager struct{ dir string }

// v2Controllers are what the runner's subtree needs, as cgroup.subtree_control takes them.
const v2Controllers = "+memory +pids +cpu"

func setupV2(mounts []mount, own map[string]string) (*v2Manager, error) {
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
	home := filepath.Join(root, own[""])
	if _, err := os.Stat(filepath.Join(home, "cgroup.controllers")); err != nil {
		home = root // inside a cgroup namespace the path may be relative to the mount already
	}
	// Touch nothing in a cgroup this process is not in: a path that resolved elsewhere (the mount's root where
	// the namespace's is not, or "/.." outside it) would have this server move another's processes.
	if !slices.Contains(procsIn(home), strconv.Itoa(os.Getpid())) {
		return nil, fmt.Errorf("this process is not in %s, the cgroup /proc/self/cgroup names", home)
	}
	if filepath.Base(home) == serverLeaf && isDir(filepath.Join(filepath.Dir(home), "safepy")) {
		// A server before this one moved the processes of its cgroup here (the shell that runs `make run` again,
		// a supervisor that restarts it): that cgroup is the home, as it was then, rather than one more level.
		home = filepath.Dir(home)
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
	if err := writeFile(filepath.Join(home, "cgroup.subtree_control"), v2Controllers); err != nil {
		// cgroup v2 lets a cgroup other than the root either hold processes or hand controllers to children
		// (the "no internal processes" rule). This process's cgroup is its own (a container's, or a service's
		// delegated subtree) but holds processes, this one and maybe an init or a shell that started it: move
		// them all into a leaf, as a container's init does, and put back what moved on failure.
		if !errors.Is(err, syscall.EBUSY) {
			return nil, fmt.Errorf("enabling controllers in %s: %w", home, err)
		}
		leaf := filepath.Join(home, serverLeaf)
		created := os.Mkdir(leaf, 0o755) == nil
		moved, err := moveProcesses(home, leaf)
		if err == nil {
			err = writeFile(filepath.Join(home, "cgroup.subtree_control"), v2Controllers)
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
	if err := writeFile(filepath.Join(safepy, "cgroup.subtree_control"), v2Controllers); err != nil {
		return nil, fmt.Errorf("enabling controllers in %s: %w", safepy, err)
	}
	removeStale(safepy)
	base := filepath.Join(safepy, runnerDir())
	if err := os.Mkdir(base, 0o755); err != nil {
		return nil, err
	}
	if err := writeFile(filepath.Join(base, "cgroup.subtree_control"), v2Controllers); err != nil {
		os.Remove(base)
		return nil, fmt.Errorf("enabling controllers in %s: %w", base, err)
	}
	return &v2Manager{dir: base}, nil
}

// serverLeaf is the cgroup the processes of the server's own move to, when that cgroup must hand its controllers
// on.
const serverLeaf = "safepy-server"

// moveProcesses moves every process of the cgroup from into the cgroup to, this one first, until from holds none
// (a process may fork meanwhile). Processes that exit meanwhile are skipped; one that is exiting may be listed for
// a while after its move was accepted (the kernel leaves an exiting task where it is), so passes go on for up to
// moveFor.
func moveProcesses(from, to string) (moved []string, err error) {
	self := strconv.Itoa(os.Getpid())
	if err := writeFile(filepath.Join(to, "cgroup.procs"), self); err != nil {
		return nil, err
	}
	moved = append(moved, self)
	for deadline, pass := time.Now().Add(moveFor), 0; ; pass++ {
		pids := procsIn(from)
		if len(pids) == 0 {
			return moved, nil
		}
		if time.Now().After(deadline) {
			return moved, fmt.Errorf("%s still holds processes %v after %s", from, pids[:min(len(pids), 8)], moveFor)
		}
		for _, pid := range pids {
			if pid == "0" {
				// A process of another PID namespace shares the cgroup: writing "0" would move this one again,
				// and the cgroup is not this server's to rearrange.
				return moved, fmt.Errorf("%s holds processes of another PID namespace", from)
			}
			if err := writeFile(filepath.Join(to, "cgroup.procs"), pid); err == nil {
				moved = append(moved, pid)
			} else if !errors.Is(err, syscall.ESRCH) {
				return moved, err
			}
		}
		if pass >= 10 {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// moveFor bounds moveProcesses.
const moveFor = 2 * time.Second

// procsIn lists the processes of a v2 cgroup (none if it cannot be read).
func procsIn(dir string) []string {
	data, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	return strings.Fields(string(data))
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

func (m *v2Manager) Mode() Mode     { return V2 }
func (m *v2Manager) Dirs() []string { return []string{m.dir} }
func (m *v2Manager) Close()         { os.Remove(m.dir) }

// limitAll caps the memory of all jails together, so that a full house of scripts at their limits cannot push
// the whole container into the OOM killer: past the cap, the kernel kills within the jails.
func (m *v2Manager) limitAll(total int64) error {
	return writeFile(filepath.Join(m.dir, "memory.max"), strconv.FormatInt(total, 10))
}

func (m *v2Manager) Create(id string, l Limits) (Cgroup, error) {
	c := &v2Cgroup{dir: filepath.Join(m.dir, id)}
	if err := os.Mkdir(c.dir, 0o755); err != nil {
		return nil, err
	}
	err := applySettings([][2]string{
		{c.dir + "/memory.max", strconv.FormatInt(l.MemoryBytes, 10)},
		{c.dir + "/memory.swap.max", "0"},
		{c.dir + "/pids.max", strconv.FormatInt(l.Processes, 10)},
		{c.dir + "/cpu.max", fmt.Sprintf("%d 100000", 100*l.CPUMsPerSec)},
	})
	if err != nil {
		_ = c.Remove()
		return nil, err
	}
	return c, nil
}

// v2Cgroup is a jail's cgroup on v2: one directory.
type v2Cgroup struct{ dir string }

func (c *v2Cgroup) Dirs() []string { return []string{c.dir} }

// Start has the kernel start cmd's process in the cgroup (clone3's CLONE_INTO_CGROUP): the thread itself never
// moves.
func (c *v2Cgroup) Start(cmd *exec.Cmd, setup func() error, ended <-chan struct{}) error {
	return startLocked(setup, ended, func() (bool, error) {
		fd, err := syscall.Open(c.dir, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return true, err
		}
		defer syscall.Close(fd)
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
		return true, cmd.Start()
	})
}

func (c *v2Cgroup) ProcsFiles() ([]*os.File, error) { return openProcs(c.Dirs()) }
func (c *v2Cgroup) Procs() []int                    { return procsOf(c.Dirs()) }
func (c *v2Cgroup) Contains(pid int) bool           { return containsProcess(pid, c.dir) }
func (c *v2Cgroup) Kill()                           { _ = writeFile(filepath.Join(c.dir, "cgroup.kill"), "1") }
func (c *v2Cgroup) Remove() error                   { return removeDirs(c.Dirs()) }
func (c *v2Cgroup) MemoryPeak() int64               { return number(filepath.Join(c.dir, "memory.peak")) }
func (c *v2Cgroup) MemoryUsage() int64              { return number(filepath.Join(c.dir, "memory.current")) }

// MemoryHeld takes v2's page cache ("file") and its reclaimable slab.
func (c *v2Cgroup) MemoryHeld() int64 {
	stat, _ := os.ReadFile(filepath.Join(c.dir, "memory.stat"))
	return held(c.MemoryUsage(), stat, "file")
}

func (c *v2Cgroup) Events() (oomKilled, pidsMax bool) {
	return counter(filepath.Join(c.dir, "memory.events"), "oom_kill") > 0,
		counter(filepath.Join(c.dir, "pids.events"), "max") > 0
}
