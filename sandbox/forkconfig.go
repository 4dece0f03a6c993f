package sandbox

import (
	"encoding/hex"

	"github.com/safe-py/safepy/internal/jaildef"
)

// A fork server is a jail made by nsjail from nsjail.cfg itself, with the differences jaildef's ForkServer derives
// so that it can build its children's jails. What a child mounts, and every other property of its jail, is the
// childPlan, also derived from nsjail.cfg: nothing of a jail's definition is written down twice.

// childPlan is what a fork server's child makes of itself; forkserver.py follows it.
type childPlan struct {
	UID      int               `json:"uid"` // inside
	GID      int               `json:"gid"`
	Hostname string            `json:"hostname"`
	Cwd      string            `json:"cwd"`
	Mounts   []childMount      `json:"mounts"`
	Rlimits  map[string]Rlimit `json:"rlimits"`
	Seccomp  string            `json:"seccomp"` // the cold jail's BPF program, hex
	Harness  harnessConfig     `json:"harness"`
	// TimeNamespace: the child makes a time namespace whose clocks start with it (clocks.go).
	TimeNamespace bool `json:"time_namespace"`
}

// childMount is a jaildef.Mount as forkserver.py reads it.
type childMount struct {
	Dst       string `json:"dst"`
	Kind      string `json:"kind"` // proc, tmpfs, or bind: Src (a fixed text nsjail put in the fork server's root) bound read-only over Dst
	Src       string `json:"src,omitempty"`
	Options   string `json:"options,omitempty"`
	RW        bool   `json:"rw"`
	Mandatory bool   `json:"mandatory"`
}

// newChildPlan assembles a child's plan: the derived mounts, the jail's identity and limits, and the cold jail's
// seccomp program.
func (r *parts) newChildPlan(fs jaildef.ForkServer, program []byte) childPlan {
	rlimits := map[string]Rlimit{}
	for k, v := range r.limits.Rlimits {
		rlimits[k] = v
	}
	// As nsjail is told on its command line for a cold jail: the start-up allowance until the script arrives.
	cpu := uint64(r.limits.CPUSeconds + startupCPUSeconds)
	rlimits["RLIMIT_CPU"] = Rlimit{Soft: cpu, Hard: cpu}
	mounts := make([]childMount, len(fs.Mounts))
	for i, m := range fs.Mounts {
		mounts[i] = childMount(m)
	}
	return childPlan{UID: jailUID, GID: fs.GID, Hostname: r.def.Hostname(), Cwd: r.def.Cwd(), Mounts: mounts,
		Rlimits: rlimits, Seccomp: hex.EncodeToString(program),
		Harness: r.harnessConfig([]string{}), TimeNamespace: r.def.TimeNamespace()}
}
