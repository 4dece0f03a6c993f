package sandbox

import (
	"fmt"

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
