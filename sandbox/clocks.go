package sandbox

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// A jail's clocks start with the jail. A time namespace (nsjail.cfg's clone_newtime) gives the jail's processes
// monotonic and boot-time clocks of their own, and with them the uptime, process start times and sysinfo the
// kernel reports to them; but it shows the host's own until its offsets are set, which can be done only before the
// first process enters it. nsjail creates a jail's namespaces and enters them in one step, leaving it no moment to
// set them; so the sandbox makes the time namespace itself: the Go side, for a cold jail's nsjail, on the thread it
// forks nsjail from (cgroup.go's start); a fork server's child, for its own jail, right after its other namespaces
// (forkserver.py).

// freshTimeNamespace puts the calling thread's future children into a new time namespace whose monotonic and
// boot-time clocks read zero now. The thread itself stays where it was; the caller throws it away.
func freshTimeNamespace() error {
	if err := unix.Unshare(unix.CLONE_NEWTIME); err != nil {
		return fmt.Errorf("creating a time namespace: %w", err)
	}
	offset := func(clock int32) string {
		var now unix.Timespec
		_ = unix.ClockGettime(clock, &now)
		// The kernel wants the nanoseconds in [0, 1e9): -now as whole seconds down and the nanoseconds back up.
		sec, nsec := -now.Sec, -now.Nsec
		if nsec < 0 {
			sec, nsec = sec-1, nsec+1e9
		}
		return fmt.Sprintf("%d %d", sec, nsec)
	}
	offsets := fmt.Sprintf("monotonic %s\nboottime %s\n", offset(unix.CLOCK_MONOTONIC), offset(unix.CLOCK_BOOTTIME))
	// /proc/TID is the thread's own, and so is the namespace its children will enter.
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/timens_offsets", unix.Gettid()), []byte(offsets), 0); err != nil {
		return fmt.Errorf("setting the time namespace's clocks: %w", err)
	}
	return nil
}
