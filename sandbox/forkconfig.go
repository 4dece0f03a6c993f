package sandbox

import (
	"encoding/hex"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// A fork server is a jail made by nsjail from nsjail.cfg itself, parsed and written back with exactly these
// differences (forkServerConfig), because it must build its children's jails:
//   - its seccomp policy also allows what its own code needs to build a jail (forkServerAllows; its code is
//     trusted and runs no script); a child installs the cold jail's filter on top, so what a child may do is what
//     a cold jail may do;
//   - its /proc is writable (a child writes its own uid_map through it) and carries none of the fixed texts (the
//     kernel lets a user namespace mount a new /proc only where the old one is fully visible);
//   - its writable tmpfs mounts are small placeholders, read-only but for /tmp (1 MiB, where it gives matplotlib
//     its config directory): each child mounts its own over them;
//   - the fixed texts that cover /proc's files are files in its root at /safepy/mask/N (written by the server,
//     mounted read-only), for each child to bind over its own /proc's files.
//
// What a child mounts, and every other property of its jail, is the childPlan, also derived from nsjail.cfg:
// nothing of a jail's definition is written down twice.

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

type childMount struct {
	Dst       string `json:"dst"`
	Kind      string `json:"kind"` // proc, tmpfs, or bind: Src (a fixed text nsjail put in the fork server's root) bound read-only over Dst
	Src       string `json:"src,omitempty"`
	Options   string `json:"options,omitempty"`
	RW        bool   `json:"rw"`
	Mandatory bool   `json:"mandatory"`
}

// placeholderOptions size the fork server's stand-ins for the writable mounts a child makes its own;
// scratchOptions its /tmp.
const (
	placeholderOptions = "size=4096,nr_inodes=4,mode=0755"
	scratchOptions     = "size=1048576,nr_inodes=64,mode=0700"
)

// forkDerivation is what forkServerConfig makes of a jail definition.
type forkDerivation struct {
	config string // the fork server's nsjail config
	mounts []childMount
	masks  []string // the fixed texts, in the order of their files in /safepy/mask
	gid    int
	// timeNamespace: nsjail.cfg gives each jail a time namespace (clone_newtime), which the child makes itself.
	timeNamespace bool
}

// coldConfig is nsjail.cfg as a cold jail's nsjail reads it: the same but for clone_newtime, whose time namespace
// the Go side makes itself (clocks.go); it reports whether nsjail.cfg asks for one.
func coldConfig(cfg *textMessage) (config string, timeNamespace bool) {
	out := &textMessage{}
	for _, f := range cfg.fields {
		if f.name == "clone_newtime" && f.msg == nil {
			timeNamespace = f.value == "true"
			continue
		}
		out.fields = append(out.fields, f)
	}
	return out.format(), timeNamespace
}

// deriveForkServer splits a parsed nsjail.cfg into the fork server's config and its children's mounts.
func deriveForkServer(cfg *textMessage) (forkDerivation, error) {
	var d forkDerivation
	policy := strings.Join(cfg.all("seccomp_string"), "\n")
	relaxed, err := forkServerPolicy(policy)
	if err != nil {
		return d, err
	}
	out := &textMessage{}
	seccompDone := false
	for _, f := range cfg.fields {
		switch {
		case f.name == "seccomp_string":
			if !seccompDone {
				out.fields = append(out.fields, textField{name: "seccomp_string", value: relaxed, quoted: true})
				seccompDone = true
			}
			continue
		case f.name == "mount" && f.msg != nil:
			m := f.msg
			dst, _ := m.scalar("dst")
			fstype, _ := m.scalar("fstype")
			rw := boolField(m, "rw", false)
			mandatory := boolField(m, "mandatory", true)
			content, hasContent := m.scalar("src_content")
			switch {
			case fstype == "proc":
				d.mounts = append(d.mounts, childMount{Dst: dst, Kind: "proc", RW: rw, Mandatory: mandatory})
				out.fields = append(out.fields, textField{name: "mount", msg: withScalars(m, map[string]string{"rw": "true"})})
				continue
			case strings.HasPrefix(dst, "/proc/") && hasContent:
				if rw {
					return d, fmt.Errorf("mount of %s: a fixed text over a /proc file must be read-only", dst)
				}
				d.masks = append(d.masks, content)
				src := fmt.Sprintf("/safepy/mask/%d", len(d.masks)-1)
				d.mounts = append(d.mounts, childMount{Dst: dst, Kind: "bind", Src: src, Mandatory: mandatory})
				continue
			case fstype == "tmpfs":
				opts, _ := m.scalar("options")
				d.mounts = append(d.mounts, childMount{Dst: dst, Kind: "tmpfs", Options: opts, RW: rw, Mandatory: mandatory})
				if strings.HasPrefix(dst, "/proc/") {
					continue // over the child's own /proc only
				}
				placeholder := map[string]string{"rw": "false", "options": placeholderOptions}
				if dst == "/tmp" {
					placeholder = map[string]string{"rw": "true", "options": scratchOptions}
				}
				out.fields = append(out.fields, textField{name: "mount", msg: withScalars(m, placeholder)})
				continue
			case strings.HasPrefix(dst, "/proc"):
				return d, fmt.Errorf("mount of %s: a fork server's child cannot make this kind of mount under /proc", dst)
			}
		case f.name == "clone_newtime":
			// The fork server needs none; each child makes its own, with the offsets nsjail cannot set (clocks.go).
			d.timeNamespace = f.value == "true"
			continue
		case f.name == "gidmap" && f.msg != nil:
			inside, _ := f.msg.scalar("inside_id")
			if d.gid, err = strconv.Atoi(inside); err != nil {
				return d, fmt.Errorf("gidmap inside_id %q: %w", inside, err)
			}
		}
		out.fields = append(out.fields, f)
	}
	if !seccompDone {
		return d, fmt.Errorf("nsjail.cfg has no seccomp policy")
	}
	d.config = out.format()
	return d, nil
}

var usePolicy = regexp.MustCompile(`(?s)\bUSE\s+(\w+)\s+DEFAULT\s+(\w+(?:\(\s*\w+\s*\))?)\s*$`)

// forkServerAllows is what the fork server's own code calls that a jail may not, and nothing more: a child builds
// its jail (unshare, mount, sethostname), becomes the request's uid (setresgid, setresuid), and drops its
// privileges (capset; prctl for the capability bounding and ambient sets, no_new_privs, dumpability and the jail's
// filter). Found as the jail's allowlist was: with the fork server's default action LOG, over the fork path's
// tests and workloads, these were the only calls it made outside the jail's allowlist.
// prctl's options: PR_SET_DUMPABLE 4, PR_SET_SECCOMP 22, PR_CAPBSET_DROP 24, PR_SET_NO_NEW_PRIVS 38, PR_CAP_AMBIENT 47.
const forkServerAllows = "unshare, mount, sethostname, setresgid, setresuid, capset, " +
	"prctl { option == 4 || option == 22 || option == 24 || option == 38 || option == 47 }"

// forkServerPolicy is the jail's Kafel policy with forkServerAllows allowed in front of it (the first rule that
// matches decides): everything else the jail refuses, the fork server refuses too, with the same answer.
func forkServerPolicy(policy string) (string, error) {
	m := usePolicy.FindStringSubmatchIndex(policy)
	if m == nil {
		return "", fmt.Errorf("the seccomp policy must end with `USE <policy> DEFAULT <action>`")
	}
	name := policy[m[2]:m[3]]
	return "POLICY safepy_forkserver { ALLOW { " + forkServerAllows + " } }\n" + policy[:m[0]] +
		"USE safepy_forkserver, USE " + name + " DEFAULT " + policy[m[4]:m[5]], nil
}

func boolField(m *textMessage, name string, def bool) bool {
	v, ok := m.scalar(name)
	if !ok {
		return def
	}
	return v == "true"
}

// withScalars is a copy of m with the given scalar fields set.
func withScalars(m *textMessage, set map[string]string) *textMessage {
	out := &textMessage{}
	done := map[string]bool{}
	for _, f := range m.fields {
		if v, ok := set[f.name]; ok && f.msg == nil {
			f.value, f.quoted = v, f.quoted || f.name == "options"
			done[f.name] = true
		}
		out.fields = append(out.fields, f)
	}
	for name, v := range set {
		if !done[name] {
			out.fields = append(out.fields, textField{name: name, value: v, quoted: name == "options"})
		}
	}
	return out
}

// readJailDefinition parses nsjail.cfg.
func readJailDefinition(path string) (*textMessage, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseText(string(data))
}

// newChildPlan assembles a child's plan: the derived mounts, the jail's identity and limits, and the cold jail's
// seccomp program.
func (r *Runner) newChildPlan(cfg *textMessage, d forkDerivation, program []byte) childPlan {
	hostname, _ := cfg.scalar("hostname")
	cwd, ok := cfg.scalar("cwd")
	if !ok {
		cwd = "/"
	}
	rlimits := map[string]Rlimit{}
	for k, v := range r.limits.Rlimits {
		rlimits[k] = v
	}
	// As nsjail is told on its command line for a cold jail: the start-up allowance until the script arrives.
	cpu := uint64(r.limits.CPUSeconds + startupCPUSeconds)
	rlimits["RLIMIT_CPU"] = Rlimit{cpu, cpu}
	return childPlan{UID: jailUID, GID: d.gid, Hostname: hostname, Cwd: cwd, Mounts: d.mounts, Rlimits: rlimits,
		Seccomp: hex.EncodeToString(program),
		Harness: r.harnessConfig([]string{}), TimeNamespace: d.timeNamespace}
}
