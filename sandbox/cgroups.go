package sandbox

import (
	"github.com/safe-py/safepy/internal/cgroup"
	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/internal/reap"
)

// CgroupMode says how the jail's memory, process and CPU limits are enforced on this host.
type CgroupMode = cgroup.Mode

const (
	CgroupV1   = cgroup.V1
	CgroupV2   = cgroup.V2
	CgroupNone = cgroup.None // no usable cgroups: RLIMIT_AS and RLIMIT_NPROC instead
)

// cgroupLimits are the limits of a jail's cgroup that gives its script l.
func cgroupLimits(l Limits) cgroup.Limits {
	return cgroup.Limits{MemoryBytes: l.MemoryBytes, Processes: l.Processes + jaildef.OverheadTasks, CPUMsPerSec: l.CPUMsPerSec}
}

// clockSetup is what the thread that forks a cold jail's nsjail does first: a time namespace whose clocks start
// with the jail (clocks.go), where the jail has one.
func (r *parts) clockSetup() func() error {
	if r.timeNamespace {
		return freshTimeNamespace
	}
	return nil
}

// dropCgroup kills what is left in a jail's (or fork server's) cgroup and removes it.
func dropCgroup(cg cgroup.Cgroup) error {
	reap.KillAll(cg)
	return cg.Remove()
}
