package sandbox

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Limits are the jail's resource limits. They are read from nsjail.cfg, the one place they are written down, so
// the Go side enforces exactly what the file declares.
type Limits struct {
	Wall        time.Duration // time_limit
	MemoryBytes int64         // cgroup_mem_max
	Processes   int64         // cgroup_pids_max
	CPUMsPerSec int64         // cgroup_cpu_ms_per_sec
	CPUSeconds  int64         // rlimit_cpu
	FileSizeMiB int64         // rlimit_fsize
	TmpfsBytes  int64         // the size= of the /sandbox tmpfs
	TmpfsInodes int           // its nr_inodes=
	// Rlimits is every resource limit a jail's processes get, by its name in Python's resource module: the ones
	// nsjail.cfg declares (nsjail applies them) and pinnedRlimits (the harness applies them).
	Rlimits map[string]Rlimit
}

// Rlimit is a soft and hard limit, in the kernel's units; Infinity is RLIM_INFINITY.
type Rlimit struct{ Soft, Hard uint64 }

// Infinity is RLIM_INFINITY.
const Infinity = ^uint64(0)

// nsjailRlimits are nsjail's rlimit fields: the resource each sets, and the unit nsjail reads its value in.
var nsjailRlimits = []struct {
	field, resource string
	unit            uint64
}{
	{"rlimit_as", "RLIMIT_AS", 1 << 20},
	{"rlimit_core", "RLIMIT_CORE", 1 << 20},
	{"rlimit_cpu", "RLIMIT_CPU", 1},
	{"rlimit_fsize", "RLIMIT_FSIZE", 1 << 20},
	{"rlimit_nofile", "RLIMIT_NOFILE", 1},
	{"rlimit_nproc", "RLIMIT_NPROC", 1},
	{"rlimit_stack", "RLIMIT_STACK", 1 << 20},
	{"rlimit_memlock", "RLIMIT_MEMLOCK", 1 << 10},
	{"rlimit_rtprio", "RLIMIT_RTPRIO", 1},
	{"rlimit_msgqueue", "RLIMIT_MSGQUEUE", 1},
}

// pinnedRlimits are the limits nsjail has no field for, which the harness sets as the jail's first process,
// before anything of the script runs. Without them a jail would inherit the server's:
//   - RLIMIT_SIGPENDING bounds the signals a jail can have queued. The kernel counts queued signals per user
//     namespace and charges every ancestor namespace too, up to the one of the user that created the jail (root),
//     so without a bound per jail one script that queues ~96,000 real-time signals makes sigqueue fail in every
//     other jail and for the server's own user. POSIX timers (timer_create) count here too.
//   - RLIMIT_NICE 0: a script may lower its priority, never raise it above its neighbours'.
var pinnedRlimits = map[string]Rlimit{
	"RLIMIT_SIGPENDING": {128, 128},
	"RLIMIT_NICE":       {0, 0},
}

// jailUID is the script's uid inside the jail. Outside, each jail is a uid of its own (see uids.go), which nsjail
// is given on its command line; its gid is nsjail.cfg's gidmap.
const jailUID = 1000

// ReadLimits reads the limits the Go side enforces itself, and every rlimit, from an nsjail config file.
func ReadLimits(path string) (Limits, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Limits{}, fmt.Errorf("reading the jail config: %w", err)
	}
	cfg, err := parseText(string(data))
	if err != nil {
		return Limits{}, fmt.Errorf("%s: %w", path, err)
	}
	num := func(key string) (int64, error) {
		v, ok := cfg.scalar(key)
		if !ok {
			return 0, fmt.Errorf("%s: %s is not set; the sandbox needs every limit written down", path, key)
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return 0, fmt.Errorf("%s: %s must be a positive integer, not %q", path, key, v)
		}
		return n, nil
	}
	var l Limits
	var wall int64
	for _, f := range []struct {
		key string
		dst *int64
	}{
		{"time_limit", &wall},
		{"cgroup_mem_max", &l.MemoryBytes},
		{"cgroup_pids_max", &l.Processes},
		{"cgroup_cpu_ms_per_sec", &l.CPUMsPerSec},
		{"rlimit_cpu", &l.CPUSeconds},
		{"rlimit_fsize", &l.FileSizeMiB},
	} {
		if *f.dst, err = num(f.key); err != nil {
			return Limits{}, err
		}
	}
	l.Wall = time.Duration(wall) * time.Second
	for _, m := range cfg.messages("mount") {
		if dst, _ := m.scalar("dst"); dst == "/sandbox" {
			opts, _ := m.scalar("options")
			for _, o := range strings.Split(opts, ",") {
				if v, ok := strings.CutPrefix(o, "size="); ok {
					l.TmpfsBytes, _ = strconv.ParseInt(v, 10, 64)
				}
				if v, ok := strings.CutPrefix(o, "nr_inodes="); ok {
					l.TmpfsInodes, _ = strconv.Atoi(v)
				}
			}
		}
	}
	if l.TmpfsBytes <= 0 || l.TmpfsInodes <= 0 {
		return Limits{}, fmt.Errorf("%s: the /sandbox tmpfs must have its size= and nr_inodes= written down", path)
	}
	if l.Rlimits, err = readRlimits(cfg); err != nil {
		return Limits{}, fmt.Errorf("%s: %w", path, err)
	}
	if nproc := l.Rlimits["RLIMIT_NPROC"].Soft; nproc <= uint64(l.Processes+jailOverheadTasks) {
		return Limits{}, fmt.Errorf("%s: rlimit_nproc (%d) must be above cgroup_pids_max (%d) and the jail's own %d processes: "+
			"the cgroup is the process limit", path, nproc, l.Processes, jailOverheadTasks)
	}
	if len(cfg.messages("uidmap")) > 0 {
		return Limits{}, fmt.Errorf("%s: uidmap must not be set: each jail gets an outside uid of its own, on nsjail's command line", path)
	}
	return l, nil
}

// readRlimits requires every nsjail rlimit to be written down as a value or as infinite, so that the file says
// what a jail gets: nsjail's other types (SOFT, HARD) take the server's own limits, which the file cannot show.
func readRlimits(cfg *textMessage) (map[string]Rlimit, error) {
	out := map[string]Rlimit{}
	for _, r := range nsjailRlimits {
		typ, _ := cfg.scalar(r.field + "_type")
		switch typ {
		case "INF":
			out[r.resource] = Rlimit{Infinity, Infinity}
		case "VALUE":
			v, ok := cfg.scalar(r.field)
			n, err := strconv.ParseUint(v, 10, 64)
			if !ok || err != nil {
				return nil, fmt.Errorf("%s_type is VALUE but %s is not a number (%q)", r.field, r.field, v)
			}
			out[r.resource] = Rlimit{n * r.unit, n * r.unit}
		default:
			return nil, fmt.Errorf("%s_type must be VALUE or INF, not %q: every limit a jail gets is written down", r.field, typ)
		}
	}
	for name, v := range pinnedRlimits {
		out[name] = v
	}
	return out, nil
}

func mib(n int64) string { return fmt.Sprintf("%d MiB", n>>20) }
