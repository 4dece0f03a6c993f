package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
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
