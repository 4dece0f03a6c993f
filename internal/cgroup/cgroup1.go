package cgroup

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
)

// v1Controllers are the hierarchies a jail's cgroup has a directory in, in the order a thread moves through them.
var v1Controllers = []string{"memory", "pids", "cpu"}

// v1Manager is a runner's cgroups on v1: a directory in each controller's hierarchy.
type v1Manager struct {
	// controller name -> the runner's directory, under which each jail gets a child ("…/memory/safepy/PID-N").
	dirs map[string]string
	// controller name -> this process's own cgroup, under which the "safepy" directory is and to which its
	// threads return after starting a jail.
	home map[string]string
}

func setupV1(mounts []mount, own map[string]string) (*v1Manager, error) {
	m := &v1Manager{dirs: map[string]string{}, home: map[string]string{}}
	for _, ctrl := range v1Controllers {
		for _, mt := range mounts {
			if mt.fstype == "cgroup" && mt.opts[ctrl] {
				home := filepath.Join(mt.dir, own[ctrl])
				if _, err := os.Stat(home); err != nil {
					home = mt.dir // inside a cgroup namespace the path may be relative to the mount already
				}
				m.home[ctrl] = home
				break
			}
		}
		if m.home[ctrl] == "" {
			return nil, fmt.Errorf("no cgroup v1 %s controller is mounted", ctrl)
		}
	}
	name := runnerDir()
	for _, ctrl := range v1Controllers {
		safepy := filepath.Join(m.home[ctrl], "safepy")
		removeStale(safepy)
		m.dirs[ctrl] = filepath.Join(safepy, name)
		if err := os.MkdirAll(m.dirs[ctrl], 0o755); err != nil {
			m.Close()
			return nil, err
		}
	}
	return m, nil
}

func (m *v1Manager) Mode() Mode { return V1 }

func (m *v1Manager) Dirs() []string { return inOrder(m.dirs) }

func (m *v1Manager) Close() {
	for _, d := range m.Dirs() {
		os.Remove(d)
	}
}

// limitAll caps the memory of all jails together, so that a full house of scripts at their limits cannot push
// the whole container into the OOM killer: past the cap, the kernel kills within the jails.
func (m *v1Manager) limitAll(total int64) error {
	return writeFile(filepath.Join(m.dirs["memory"], "memory.limit_in_bytes"), strconv.FormatInt(total, 10))
}

func (m *v1Manager) Create(id string, l Limits) (Cgroup, error) {
	c := &v1Cgroup{dirs: map[string]string{}, home: m.home}
	for ctrl, base := range m.dirs {
		c.dirs[ctrl] = filepath.Join(base, id)
	}
	for _, dir := range c.Dirs() {
		if err := os.Mkdir(dir, 0o755); err != nil {
			_ = c.Remove()
			return nil, err
		}
	}
	period := int64(100000)
	mem := strconv.FormatInt(l.MemoryBytes, 10)
	err := applySettings([][2]string{
		{c.dirs["memory"] + "/memory.limit_in_bytes", mem},
		{c.dirs["memory"] + "/memory.swappiness", "0"},
		{c.dirs["memory"] + "/memory.memsw.limit_in_bytes", mem},
		{c.dirs["pids"] + "/pids.max", strconv.FormatInt(l.Processes, 10)},
		{c.dirs["cpu"] + "/cpu.cfs_period_us", strconv.FormatInt(period, 10)},
		{c.dirs["cpu"] + "/cpu.cfs_quota_us", strconv.FormatInt(period*l.CPUMsPerSec/1000, 10)},
	})
	if err != nil {
		_ = c.Remove()
		return nil, err
	}
	return c, nil
}

// v1Cgroup is a jail's cgroup on v1: one directory per controller.
type v1Cgroup struct {
	dirs map[string]string // controller -> directory
	home map[string]string // controller -> this process's own cgroup
}

func (c *v1Cgroup) Dirs() []string { return inOrder(c.dirs) }

// inOrder lists the directories of a controller -> directory map in v1Controllers' order, so that processes are
// listed and signalled in the same order every time.
func inOrder(dirs map[string]string) []string {
	var out []string
	for _, ctrl := range v1Controllers {
		if d := dirs[ctrl]; d != "" {
			out = append(out, d)
		}
	}
	return out
}

// Start moves the forking thread into the jail's cgroups and, once it has forked, back home; a thread that
// cannot go back stays where it is and is thrown away.
func (c *v1Cgroup) Start(cmd *exec.Cmd, setup func() error, ended <-chan struct{}) error {
	return startLocked(setup, ended, func() (bool, error) {
		tid := strconv.Itoa(syscall.Gettid())
		move := func(dirs map[string]string) error {
			for _, ctrl := range v1Controllers {
				if err := writeFile(filepath.Join(dirs[ctrl], "tasks"), tid); err != nil {
					return err
				}
			}
			return nil
		}
		err := move(c.dirs)
		if err == nil {
			err = cmd.Start()
		}
		return move(c.home) == nil, err
	})
}

func (c *v1Cgroup) ProcsFiles() ([]*os.File, error) { return openProcs(c.Dirs()) }
func (c *v1Cgroup) Procs() []int                    { return procsOf(c.Dirs()) }
func (c *v1Cgroup) Contains(pid int) bool           { return containsProcess(pid, c.dirs["memory"]) }
func (c *v1Cgroup) Kill()                           {} // v1 has no cgroup.kill: the caller's signals do it
func (c *v1Cgroup) Remove() error                   { return removeDirs(c.Dirs()) }

func (c *v1Cgroup) MemoryPeak() int64 {
	return number(filepath.Join(c.dirs["memory"], "memory.max_usage_in_bytes"))
}

func (c *v1Cgroup) MemoryUsage() int64 {
	return number(filepath.Join(c.dirs["memory"], "memory.usage_in_bytes"))
}

// MemoryHeld takes v1's page cache ("cache"); v1 has no count of reclaimable slab to take off.
func (c *v1Cgroup) MemoryHeld() int64 {
	stat, _ := os.ReadFile(filepath.Join(c.dirs["memory"], "memory.stat"))
	return held(c.MemoryUsage(), stat, "cache")
}

func (c *v1Cgroup) Events() (oomKilled, pidsMax bool) {
	return counter(filepath.Join(c.dirs["memory"], "memory.oom_control"), "oom_kill") > 0,
		counter(filepath.Join(c.dirs["pids"], "pids.events"), "max") > 0
}
