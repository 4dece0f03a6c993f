package sandbox

import (
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/safe-py/safepy/internal/cgroup"
)

// Capacity: how many jails a machine runs at once, from what a jail is allowed and what it was measured to hold.

// ServerShare is the memory kept for the server itself, outside every jail.
const ServerShare = 256 << 20

// The memory set aside besides each running jail's limit, from what jails were measured to hold (TestBaseMemory,
// and the bench's cgroup peaks):
//   - a slot's share of the warm pools, one jail per pool (plain, numpy, numpy+pandas, and those with
//     matplotlib). Forked, a warm jail holds only its own pages: what it wrote, and the copies it prefaulted of
//     its fork server's (4, 5, 8 and 22 MiB at rest: 39 MiB for the four); cold, its whole interpreter: about 9,
//     18, 48 and 75 MiB.
//   - the fork servers, once: about 12, 24, 50 and 75 MiB, and one more while a replacement starts.
const (
	warmForkedPerSlot = 64 << 20
	warmColdPerSlot   = 160 << 20
	forkServersShare  = 256 << 20
)

// MemoryPlan is what the service sets aside: per slot (a jail at its limit and its share of the warm jails), and
// once (the server's share, and the fork servers if there are any).
func MemoryPlan(jailMemory int64, forked bool) (perSlot, fixed int64) {
	if forked {
		return jailMemory + warmForkedPerSlot, ServerShare + forkServersShare
	}
	return jailMemory + warmColdPerSlot, ServerShare
}

// Slots fits the number of jails running at once to the machine: one per CPU, so that a script's wall time
// is a CPU's worth of time and a neighbour's busy loop cannot push it into a timeout; and no more than the memory
// left after what is set aside once holds, each slot with a jail at its limit and its warm jails.
func Slots(jailMemory, mem int64, forked bool) int {
	slots := runtime.NumCPU()
	if perSlot, fixed := MemoryPlan(jailMemory, forked); mem > 0 && jailMemory > 0 {
		if byMemory := int((mem - fixed) / perSlot); byMemory < slots {
			slots = byMemory
		}
	}
	return max(slots, 1)
}

// AvailableMemory is the lowest memory limit of this process's cgroups if there is one (Cloud Run's container
// has one; so may a systemd unit or a slice above it), else the machine's memory.
func AvailableMemory() int64 {
	best := cgroup.MemoryLimit()
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil && (best == 0 || kb<<10 < best) {
					best = kb << 10
				}
			}
		}
	}
	return best
}
