package sandbox

import (
	"log/slog"
	"time"

	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/internal/uids"
)

// DefaultUIDBase is where the jails' outside uids start unless Config.UIDBase says otherwise.
const DefaultUIDBase = uids.DefaultBase

// Config says where the sandbox's pieces are. The zero value of each size means its default.
type Config struct {
	// Log is where the sandbox reports what it works around (a fork server that failed, a jail that starts cold
	// instead); the service passes its own, so that these lines are Cloud Logging's JSON under every server.
	// Default: slog.Default().
	Log *slog.Logger

	Nsjail     string // the nsjail binary
	JailConfig string // nsjail.cfg
	// Definition is nsjail.cfg already read (jaildef.Read with Nsjail and JailConfig), for a caller that needed its
	// limits before making the Runner; nil: New reads it.
	Definition *jaildef.Definition
	RuntimeDir string // what runtime/install.sh installed: python/ is mounted at /usr/local in the jail
	Cgroup     string // "auto" (default), "v1", "v2" or "none"

	MaxStdoutBytes int // default 1 MiB
	MaxStderrBytes int // default 1 MiB
	MaxResultBytes int // default 1 MiB

	// Warm jails are kept started ahead of time, waiting for a script, in pools of PoolSize each: plain ones (the
	// interpreter up) and one pool per prefix of Preload (with the default: numpy; numpy and pandas; those and
	// matplotlib.pyplot). A script gets
	// a jail from the smallest pool that has every Preload module it names, so a warm jail does ahead of time only
	// what the script would have done itself, never more. A warm jail serves one script and is destroyed; one
	// older than PoolMaxAge is replaced without serving. PoolSize 0 turns the pools off: every jail starts cold,
	// on the request's path.
	PoolSize   int
	PoolMaxAge time.Duration // default 5 minutes
	Preload    []string      // default numpy, pandas, matplotlib.pyplot
	// AllJailsMemory caps the memory of all jails together (running and warm), where there are cgroups; 0: no cap.
	AllJailsMemory int64

	// Busy reports that the service has no CPU to spare: the pools do not refill while it is true, so a
	// saturated service runs exactly as it would with no pools. Default: as many executions run as there are CPUs.
	Busy func() bool

	// StartupTimeout bounds how long a jail may take to come up before the sandbox counts as broken.
	StartupTimeout time.Duration // default 20 s

	// UIDBase is where the range of outside uids for the jails starts (see internal/uids). Default DefaultUIDBase.
	UIDBase int

	// ForkServers makes jails by forking them from fork servers (forkserver.go), where the host allows it, instead
	// of starting an nsjail per jail. The warm pools are then refilled by fork. PoolSize 0 turns them off too.
	ForkServers     bool
	ForkServerAge   time.Duration // a fork server older than this is replaced; default 10 minutes
	ForkServerForks int64         // a fork server that forked this many children is replaced; default 1000
}

// Info describes how the sandbox is enforcing its policy on this host, for the start-up log.
type Info struct {
	CgroupMode CgroupMode
	CgroupNote string // why cgroups are not used, in rlimits mode
	Path       string // "forked" when jails are forked from fork servers, else "cold"
	PathNote   string // why jails are cold
	Limits     Limits
	Versions   string // what runtime/install.sh installed (nsjail, Python, packages)
}
