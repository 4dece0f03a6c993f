package sandbox

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// A jail's clocks start with the jail. A time namespace (nsjail.cfg's clone_newtime) gives the jail's processes
// monotonic and boot-time clocks of their own, and with them the uptime, process start times and sysinfo the
// kernel reports to them; but it shows the host's own until its offsets are set, which can be done only before the
// first process enters it. nsjail creates a jail's namespaces and enters them in one step, leaving it no moment to
// set them; so the sandbox makes the time namespace itself: the Go side, for a cold jail's nsjail, on the thread it
// forks nsjail from (internal/cgroup's Start, with freshTimeNamespace as its setup); a fork server's child, for its own jail, right after its other namespaces
// (forkserver.py).
//
// A time namespace's offsets are from the host's clocks, not from those of the namespace it was made in: the
// server may itself run in one (a container may give it one, the CI's guest does), whose offsets are taken off
// what it reads before the new offsets are set.

// freshTimeNamespace puts the calling thread's future children into a new time namespace whose monotonic and
// boot-time clocks read zero now. The thread itself stays where it was; the caller throws it away.
func freshTimeNamespace() error {
	// The file shows the namespace this thread's children would enter: before the unshare, its own.
	own, err := os.ReadFile(fmt.Sprintf("/proc/%d/timens_offsets", unix.Gettid()))
	if err != nil {
		return fmt.Errorf("reading the time namespace's offsets: %w", err)
	}
	ownOffsets, err := parseTimeOffsets(string(own))
	if err != nil {
		return err
	}
	if err := unix.Unshare(unix.CLONE_NEWTIME); err != nil {
		return fmt.Errorf("creating a time namespace: %w", err)
	}
	offsets := ""
	for _, c := range []struct {
		name  string
		clock int32
	}{{"monotonic", unix.CLOCK_MONOTONIC}, {"boottime", unix.CLOCK_BOOTTIME}} {
		var now unix.Timespec
		_ = unix.ClockGettime(c.clock, &now)
		offsets += c.name + " " + zeroOffset(now.Nano()-ownOffsets[c.name]) + "\n"
	}
	// /proc/TID is the thread's own, and so is the namespace its children will enter.
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/timens_offsets", unix.Gettid()), []byte(offsets), 0); err != nil {
		return fmt.Errorf("setting the time namespace's clocks: %w", err)
	}
	return nil
}

// zeroOffset is the offset, as timens_offsets reads it, that makes a clock of the host that reads hostNanos read
// zero: whole seconds down, and nanoseconds in [0, 1e9), as the kernel wants them.
func zeroOffset(hostNanos int64) string {
	sec, nsec := -hostNanos/1e9, -hostNanos%1e9
	if nsec < 0 {
		sec, nsec = sec-1, nsec+1e9
	}
	return fmt.Sprintf("%d %d", sec, nsec)
}

// parseTimeOffsets reads /proc/PID/timens_offsets: a line per clock, its name (or number), seconds and nanoseconds.
func parseTimeOffsets(text string) (map[string]int64, error) {
	names := map[string]string{"1": "monotonic", "7": "boottime", "monotonic": "monotonic", "boottime": "boottime"}
	out := map[string]int64{}
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 || names[f[0]] == "" {
			return nil, fmt.Errorf("unexpected timens_offsets line %q", line)
		}
		sec, err1 := strconv.ParseInt(f[1], 10, 64)
		nsec, err2 := strconv.ParseInt(f[2], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("unexpected timens_offsets line %q", line)
		}
		out[names[f[0]]] = sec*1e9 + nsec
	}
	return out, nil
}
