// Package jaildef reads nsjail.cfg, the jail's one definition, and derives from it what the sandbox gives nsjail:
// the cold jail's config and the fork server's. The file is read with the schema of the nsjail that will run it,
// so the Go side and nsjail cannot disagree about what it says.
package jaildef

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
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
	// nsjail.cfg declares (nsjail applies them) and PinnedRlimits (the harness applies them).
	Rlimits map[string]Rlimit
}

// Rlimit is a soft and hard limit, in the kernel's units; Infinity is RLIM_INFINITY.
type Rlimit struct{ Soft, Hard uint64 }

// Infinity is RLIM_INFINITY.
const Infinity = ^uint64(0)

// OverheadTasks are a jail cgroup's tasks that are not the script's: nsjail and the harness's init. The script
// gets the whole process limit for itself, so rlimit_nproc must leave room for these too.
const OverheadTasks = 2

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

// PinnedRlimits are the limits nsjail has no field for, which the harness sets as the jail's first process,
// before anything of the script runs. Without them a jail would inherit the server's:
//   - RLIMIT_SIGPENDING bounds the signals a jail can have queued. The kernel counts queued signals per user
//     namespace and charges every ancestor namespace too, up to the one of the user that created the jail (root),
//     so without a bound per jail one script that queues ~96,000 real-time signals makes sigqueue fail in every
//     other jail and for the server's own user. POSIX timers (timer_create) count here too.
//   - RLIMIT_NICE 0: a script may lower its priority, never raise it above its neighbours'.
var PinnedRlimits = map[string]Rlimit{
	"RLIMIT_SIGPENDING": {128, 128},
	"RLIMIT_NICE":       {0, 0},
}

// meminfoPath is the /proc file whose fixed text tells a script how much memory it has: the sandbox writes it from
// cgroup_mem_max, so the number cannot drift from the limit.
const meminfoPath = "/proc/meminfo"

// Definition is a parsed nsjail.cfg, with the texts the sandbox derives from it.
type Definition struct {
	cfg    *dynamicpb.Message // as nsjail.cfg says, but for /proc/meminfo's content, filled in from the limit
	limits Limits
}

// Read parses the nsjail config at cfgPath with the schema of the nsjail binary at nsjailPath, and checks that it
// writes down every limit the sandbox enforces.
func Read(nsjailPath, cfgPath string) (*Definition, error) {
	md, err := readSchema(nsjailPath)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(cfgPath)
	if err != nil {
		return nil, fmt.Errorf("reading the jail config: %w", err)
	}
	d, err := parse(md, data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cfgPath, err)
	}
	return d, nil
}

// usedFields are the fields of nsjail's config this package reads or writes, by message; an nsjail without one of
// them cannot run this sandbox's jails.
var usedFields = map[string][]string{
	"NsJailConfig": {"hostname", "cwd", "clone_newtime", "time_limit", "cgroup_mem_max", "cgroup_pids_max",
		"cgroup_cpu_ms_per_sec", "mount", "uidmap", "gidmap", "seccomp_string"},
	"MountPt": {"dst", "fstype", "options", "rw", "mandatory", "src_content"},
	"IdMap":   {"inside_id"},
}

// checkSchema makes sure nsjail's schema has every field this package uses, so that field never fails.
func checkSchema(md protoreflect.MessageDescriptor) error {
	has := func(msg, name string) error {
		m := md.ParentFile().Messages().ByName(protoreflect.Name(msg))
		if m == nil || m.Fields().ByName(protoreflect.Name(name)) == nil {
			return fmt.Errorf("this nsjail's config has no %s.%s, which the sandbox needs", msg, name)
		}
		return nil
	}
	for msg, names := range usedFields {
		for _, name := range names {
			if err := has(msg, name); err != nil {
				return err
			}
		}
	}
	for _, r := range nsjailRlimits {
		if err := errors.Join(has("NsJailConfig", r.field), has("NsJailConfig", r.field+"_type")); err != nil {
			return err
		}
	}
	return nil
}

func parse(md protoreflect.MessageDescriptor, data []byte) (*Definition, error) {
	if err := checkSchema(md); err != nil {
		return nil, err
	}
	cfg := dynamicpb.NewMessage(md)
	if err := prototext.Unmarshal(data, cfg); err != nil {
		return nil, err
	}
	limits, err := readLimits(cfg)
	if err != nil {
		return nil, err
	}
	if err := fillMeminfo(cfg, limits.MemoryBytes); err != nil {
		return nil, err
	}
	return &Definition{cfg: cfg, limits: limits}, nil
}

// Limits returns the jail's limits; the map is the caller's own.
func (d *Definition) Limits() Limits {
	l := d.limits
	l.Rlimits = make(map[string]Rlimit, len(d.limits.Rlimits))
	for k, v := range d.limits.Rlimits {
		l.Rlimits[k] = v
	}
	return l
}

// Hostname is the jail's hostname, as nsjail sets it.
func (d *Definition) Hostname() string { return get(d.cfg, "hostname").String() }

// Cwd is the directory the jail's first process starts in.
func (d *Definition) Cwd() string { return get(d.cfg, "cwd").String() }

// TimeNamespace reports whether nsjail.cfg gives each jail a time namespace (clone_newtime), which the sandbox
// makes itself: nsjail cannot set a time namespace's clocks.
func (d *Definition) TimeNamespace() bool { return get(d.cfg, "clone_newtime").Bool() }

// ColdConfig is nsjail.cfg as a cold jail's nsjail reads it: the same but for clone_newtime, whose namespace the
// sandbox makes itself.
func (d *Definition) ColdConfig() string {
	cfg := proto.Clone(d.cfg).ProtoReflect()
	cfg.Clear(field(cfg, "clone_newtime"))
	return prototext.Format(cfg.Interface())
}

// readLimits reads the limits the Go side enforces itself, and every rlimit.
func readLimits(cfg protoreflect.Message) (Limits, error) {
	num := func(key string) (int64, error) {
		fd := field(cfg, key)
		if !cfg.Has(fd) {
			return 0, fmt.Errorf("%s is not set; the sandbox needs every limit written down", key)
		}
		n := cfg.Get(fd).Uint()
		if n == 0 || n > 1<<62 {
			return 0, fmt.Errorf("%s must be a positive integer, not %d", key, n)
		}
		return int64(n), nil
	}
	var l Limits
	var wall int64
	var err error
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
	for _, m := range messages(cfg, "mount") {
		if get(m, "dst").String() != "/sandbox" {
			continue
		}
		for _, o := range strings.Split(get(m, "options").String(), ",") {
			if v, ok := strings.CutPrefix(o, "size="); ok {
				l.TmpfsBytes, _ = strconv.ParseInt(v, 10, 64)
			}
			if v, ok := strings.CutPrefix(o, "nr_inodes="); ok {
				l.TmpfsInodes, _ = strconv.Atoi(v)
			}
		}
	}
	if l.TmpfsBytes <= 0 || l.TmpfsInodes <= 0 {
		return Limits{}, fmt.Errorf("the /sandbox tmpfs must have its size= and nr_inodes= written down")
	}
	if l.Rlimits, err = readRlimits(cfg); err != nil {
		return Limits{}, err
	}
	if nproc := l.Rlimits["RLIMIT_NPROC"].Soft; nproc <= uint64(l.Processes+OverheadTasks) {
		return Limits{}, fmt.Errorf("rlimit_nproc (%d) must be above cgroup_pids_max (%d) and the jail's own %d processes: "+
			"the cgroup is the process limit", nproc, l.Processes, OverheadTasks)
	}
	if len(messages(cfg, "uidmap")) > 0 {
		return Limits{}, fmt.Errorf("uidmap must not be set: each jail gets an outside uid of its own, on nsjail's command line")
	}
	return l, nil
}

// readRlimits requires every nsjail rlimit to be written down as a value or as infinite, so that the file says
// what a jail gets: nsjail's other types (SOFT, HARD) take the server's own limits, which the file cannot show, and
// its defaults are nsjail's choice, not the file's.
func readRlimits(cfg protoreflect.Message) (map[string]Rlimit, error) {
	out := map[string]Rlimit{}
	for _, r := range nsjailRlimits {
		typField := field(cfg, r.field+"_type")
		typ := ""
		if cfg.Has(typField) {
			typ = string(typField.Enum().Values().ByNumber(cfg.Get(typField).Enum()).Name())
		}
		switch typ {
		case "INF":
			out[r.resource] = Rlimit{Infinity, Infinity}
		case "VALUE":
			fd := field(cfg, r.field)
			if !cfg.Has(fd) {
				return nil, fmt.Errorf("%s_type is VALUE but %s is not set", r.field, r.field)
			}
			n := cfg.Get(fd).Uint()
			out[r.resource] = Rlimit{n * r.unit, n * r.unit}
		default:
			return nil, fmt.Errorf("%s_type must be VALUE or INF, not %q: every limit a jail gets is written down", r.field, typ)
		}
	}
	for name, v := range PinnedRlimits {
		out[name] = v
	}
	return out, nil
}

// fillMeminfo writes /proc/meminfo's fixed text from the memory limit, in the kernel's layout: the jail has what
// its cgroup lets it have, all of it free.
func fillMeminfo(cfg protoreflect.Message, memoryBytes int64) error {
	kb := memoryBytes >> 10
	var text strings.Builder
	for _, line := range []struct {
		name string
		kb   int64
	}{
		{"MemTotal", kb}, {"MemFree", kb}, {"MemAvailable", kb}, {"Buffers", 0}, {"Cached", 0},
		{"SwapTotal", 0}, {"SwapFree", 0},
	} {
		fmt.Fprintf(&text, "%-16s%8d kB\n", line.name+":", line.kb)
	}
	for _, m := range messages(cfg, "mount") {
		if get(m, "dst").String() != meminfoPath {
			continue
		}
		content := field(m, "src_content")
		if len(m.Get(content).Bytes()) > 0 {
			return fmt.Errorf("the mount of %s must not write its content: the sandbox writes it from cgroup_mem_max", meminfoPath)
		}
		m.Set(content, protoreflect.ValueOfBytes([]byte(text.String())))
	}
	return nil
}

// field is the named field of m's message. The names are nsjail's; one it does not have is this package's bug.
func field(m protoreflect.Message, name string) protoreflect.FieldDescriptor {
	fd := m.Descriptor().Fields().ByName(protoreflect.Name(name))
	if fd == nil {
		panic(fmt.Sprintf("nsjail's %s has no field %s", m.Descriptor().FullName(), name))
	}
	return fd
}

// get is the named field's value, or its default.
func get(m protoreflect.Message, name string) protoreflect.Value { return m.Get(field(m, name)) }

// messages are the elements of a repeated message field.
func messages(m protoreflect.Message, name string) []protoreflect.Message {
	list := get(m, name).List()
	out := make([]protoreflect.Message, list.Len())
	for i := range out {
		out[i] = list.Get(i).Message()
	}
	return out
}
