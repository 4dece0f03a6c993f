package sandbox

import (
	"fmt"
	"strconv"

	"github.com/safe-py/safepy/internal/jaildef"
)

// Limits are the jail's resource limits, as nsjail.cfg writes them down (internal/jaildef reads them); the root
// package and the commands know them by this name.
type Limits = jaildef.Limits

// Rlimit is a soft and hard limit, in the kernel's units; Infinity is RLIM_INFINITY.
type Rlimit = jaildef.Rlimit

// Infinity is RLIM_INFINITY.
const Infinity = jaildef.Infinity

// jailUID is the script's uid inside the jail. Outside, each jail is a uid of its own (see uids.go), which nsjail
// is given on its command line; its gid is nsjail.cfg's gidmap.
const jailUID = 1000

func mib(n int64) string { return fmt.Sprintf("%d MiB", n>>20) }

// AddressSpaceAllowance is added to the memory limit for RLIMIT_AS where there are no cgroups (withoutCgroups).
const AddressSpaceAllowance = 192 << 20

// What a jail gets, on each path. Cold, with cgroups: nsjail.cfg's limits as written (jaildef.Definition.Limits).
// The other paths derive theirs from those, here.

// withoutCgroups is what a cold jail gets where there are no usable cgroups (rlimits mode), and the nsjail options
// that set it. Memory is bounded by address space, which counts what libraries reserve but never use: numpy and
// pandas reserve some 150 MiB, and AddressSpaceAllowance keeps a pandas script's 200 MiB possible. RLIMIT_NPROC
// counts the jail's user in its own user namespace: the harness's init and the script. (No fork servers here: the
// fork path needs cgroups.)
func withoutCgroups(l Limits) (Limits, []string) {
	as := uint64(l.MemoryBytes + AddressSpaceAllowance)
	nproc := uint64(l.Processes + 1)
	l.Rlimits["RLIMIT_AS"] = Rlimit{Soft: as, Hard: as}
	l.Rlimits["RLIMIT_NPROC"] = Rlimit{Soft: nproc, Hard: nproc}
	return l, []string{"--rlimit_as", strconv.FormatUint(as>>20, 10), "--rlimit_nproc", strconv.FormatUint(nproc, 10)}
}

// forkShare is what a fork server's jails hold of it without holding it in their own cgroups.
type forkShare struct {
	base int64 // what the fork server's cgroup holds once its modules are in, less the page cache (MemoryHeld)
	// copies is what a typical script of the preload set copies of the fork server's pages by writing them (at
	// least what the kernel charged the fork server's training child for them: forkserver.py's train).
	copies int64
	// prefault is what a warm child populates ahead of time of the pages the typical script wrote, the copies
	// among them: all of it is charged to the child.
	prefault int64
}

// forkedLimits are the limits of a jail forked from a fork server with share, its memory limit the one that differs: a script in it has what it would have in a cold
// jail, which holds everything it uses in its own cgroup.
//
// The pages the fork server preloaded stay charged to the fork server's cgroup (no cgroup version moves charges),
// and count as the jail's all the same: the jail's cgroup is that much smaller (share.base). But a page of the fork
// server's that the jail writes is copied, and the copy is charged to the jail while the original stays charged
// to the fork server: counted twice, where a cold jail holds it once. So the limit is raised by what a typical
// script of the preload set copies (share.copies, measured by the fork server's training run); a prefaulted jail,
// which copies that ahead of time and populates the pages around it too, is raised by all it populates
// (share.prefault) instead. A script that copies what the typical one does then has what it has cold; one that copies
// less has up to that much more (the limit cannot know), one that copies more has less. Never above a cold
// jail's limit: the memory the service sets aside per slot (MemoryPlan) holds one jail at its limit.
func forkedLimits(l Limits, share forkShare, prefault bool) Limits {
	room := share.copies
	if prefault {
		room = max(room, share.prefault)
	}
	l.MemoryBytes = min(l.MemoryBytes-share.base+room, l.MemoryBytes)
	return l
}
