package cgroup

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// Detect finds a cgroup hierarchy this process may use and prepares a "safepy" parent in it, its runner's
// directory under that, and (total > 0) a cap on the memory of all its jails together. want is "auto", "v1", "v2"
// or "none". With "auto" it prefers v2, then v1, then rlimits, and says in the error why it did not use what it
// passed over; otherwise it fails (a nil Manager) if it cannot have what was asked for. probe is a program to
// start in a probe cgroup with limits l, the way jails will be started.
func Detect(want string, l Limits, probe string, total int64) (Manager, error) {
	return detect(want, l, probe, total, "/proc/self/mountinfo", "/proc/self/cgroup")
}

func detect(want string, l Limits, probe string, total int64, mountinfo, own string) (Manager, error) {
	try, err := candidates(want)
	if err != nil {
		return nil, err
	}
	if len(try) == 0 {
		return none{}, nil
	}
	mounts, err := readMounts(mountinfo)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, mode := range try {
		m, err := setup(mode, mounts, own)
		if err == nil && total > 0 {
			err = m.limitAll(total)
		}
		if err == nil {
			err = prove(m, l, probe)
		}
		if err == nil {
			return m, nil
		}
		if m != nil {
			m.Close()
		}
		errs = append(errs, fmt.Errorf("%s: %w", mode, err))
	}
	if want == "auto" || want == "" {
		return none{}, errors.Join(errs...)
	}
	return nil, errors.Join(errs...)
}

// candidates are the hierarchies to try, in order, for a wanted mode; none for "none".
func candidates(want string) ([]Mode, error) {
	switch want {
	case "", "auto":
		return []Mode{V2, V1}, nil
	case "v1":
		return []Mode{V1}, nil
	case "v2":
		return []Mode{V2}, nil
	case "none":
		return nil, nil
	}
	return nil, fmt.Errorf("unknown cgroup mode %q (want auto, v1, v2 or none)", want)
}

func setup(mode Mode, mounts []mount, ownFile string) (Manager, error) {
	data, err := os.ReadFile(ownFile)
	if err != nil {
		return nil, err
	}
	own := parseOwn(data)
	if mode == V2 {
		m, err := setupV2(mounts, own)
		if m == nil {
			return nil, err // not a typed nil in the interface
		}
		return m, err
	}
	m, err := setupV1(mounts, own)
	if m == nil {
		return nil, err
	}
	return m, err
}

// prove shows that the hierarchy works before it is relied on: a cgroup with the real limits, a process started
// inside it the way jails will be (clone3 may be refused where v2 is not), and the cgroup removed.
func prove(m Manager, l Limits, probe string) error {
	c, err := m.Create("probe-"+strconv.Itoa(os.Getpid()), l)
	if err != nil {
		return err
	}
	cmd := exec.Command(probe, "--help")
	if err = c.Start(cmd, nil, nil); err == nil {
		_ = cmd.Wait()
	}
	if rerr := c.Remove(); err == nil {
		err = rerr
	}
	return err
}

// MemoryLimit is the lowest memory limit over this process's cgroup and the cgroups above it (a container's, a
// systemd unit's MemoryMax=), on whichever hierarchy has the memory controller; 0 if none is set. A cgroup limits
// its descendants, so the mount's top alone can be far above what this process may use.
func MemoryLimit() int64 { return memoryLimit("/proc/self/mountinfo", "/proc/self/cgroup") }

func memoryLimit(mountinfo, ownFile string) int64 {
	mounts, err := readMounts(mountinfo)
	if err != nil {
		return 0
	}
	data, err := os.ReadFile(ownFile)
	if err != nil {
		return 0
	}
	own := parseOwn(data)
	lowest := int64(0)
	consider := func(n int64) {
		if n > 0 && n < 1<<50 && (lowest == 0 || n < lowest) { // v1 writes "no limit" as a number near 2^63
			lowest = n
		}
	}
	for _, m := range mounts {
		var file, dir string
		switch {
		case m.fstype == "cgroup2":
			file = "memory.max" // "max" reads as 0: no limit
			dir = ownDir(m.dir, own[""])
		case m.opts["memory"]:
			file = "memory.limit_in_bytes"
			dir = ownDir(m.dir, own["memory"])
		default:
			continue
		}
		for d := dir; ; d = filepath.Dir(d) {
			consider(number(filepath.Join(d, file)))
			if d == m.dir || !strings.HasPrefix(d, m.dir) {
				break
			}
		}
	}
	return lowest
}

// ownDir is this process's cgroup on a hierarchy mounted at root; the mount's top where the path is not in it
// (inside a cgroup namespace, the path may be relative to the mount already).
func ownDir(root, path string) string {
	dir := filepath.Join(root, path)
	if rel, err := filepath.Rel(root, dir); err != nil || strings.HasPrefix(rel, "..") {
		return root
	}
	if _, err := os.Stat(dir); err != nil {
		return root
	}
	return dir
}
