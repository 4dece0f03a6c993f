package jaildef

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// A fork server is a jail made by nsjail from nsjail.cfg itself, with exactly these differences, because it must
// build its children's jails:
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
// What a child mounts, and every other property of its jail, is derived from nsjail.cfg too: nothing of a jail's
// definition is written down twice.

// ForkServer is what a fork server is made of.
type ForkServer struct {
	Config string  // the fork server's nsjail config
	Mounts []Mount // what each child mounts over the fork server's root, in order
	Masks  []string
	GID    int // the jail's gid inside (gidmap)
}

// MaskDir is where the fork server sees Masks, each as a file named by its index.
const MaskDir = "/safepy/mask"

// Mount is a mount a fork server's child makes for its jail.
type Mount struct {
	Dst       string
	Kind      string // proc, tmpfs, or bind: Src (a fixed text in the fork server's MaskDir) bound read-only over Dst
	Src       string
	Options   string
	RW        bool
	Mandatory bool
}

// placeholderOptions size the fork server's stand-ins for the writable mounts a child makes its own;
// scratchOptions its /tmp.
const (
	placeholderOptions = "size=4096,nr_inodes=4,mode=0755"
	scratchOptions     = "size=1048576,nr_inodes=64,mode=0700"
)

// ForkServer derives the fork server's config and its children's mounts.
func (d *Definition) ForkServer() (ForkServer, error) {
	var fs ForkServer
	cfg := proto.Clone(d.cfg).ProtoReflect()
	seccomp := field(cfg, "seccomp_string")
	var policy []string
	for i, list := 0, cfg.Get(seccomp).List(); i < list.Len(); i++ {
		policy = append(policy, list.Get(i).String())
	}
	if len(policy) == 0 {
		return fs, fmt.Errorf("nsjail.cfg has no seccomp policy")
	}
	relaxed, err := forkServerPolicy(strings.Join(policy, "\n"))
	if err != nil {
		return fs, err
	}
	list := cfg.NewField(seccomp).List()
	list.Append(protoreflect.ValueOfString(relaxed))
	cfg.Set(seccomp, protoreflect.ValueOfList(list))

	mountField := field(cfg, "mount")
	kept := cfg.NewField(mountField).List()
	for _, m := range messages(cfg, "mount") {
		dst := get(m, "dst").String()
		fstype := get(m, "fstype").String()
		rw := get(m, "rw").Bool()
		mandatory := get(m, "mandatory").Bool()
		switch {
		case fstype == "proc":
			fs.Mounts = append(fs.Mounts, Mount{Dst: dst, Kind: "proc", RW: rw, Mandatory: mandatory})
			m.Set(field(m, "rw"), protoreflect.ValueOfBool(true))
		case strings.HasPrefix(dst, "/proc/") && m.Has(field(m, "src_content")):
			if rw {
				return fs, fmt.Errorf("mount of %s: a fixed text over a /proc file must be read-only", dst)
			}
			fs.Masks = append(fs.Masks, string(get(m, "src_content").Bytes()))
			src := fmt.Sprintf("%s/%d", MaskDir, len(fs.Masks)-1)
			fs.Mounts = append(fs.Mounts, Mount{Dst: dst, Kind: "bind", Src: src, Mandatory: mandatory})
			continue
		case fstype == "tmpfs":
			fs.Mounts = append(fs.Mounts, Mount{Dst: dst, Kind: "tmpfs", Options: get(m, "options").String(), RW: rw, Mandatory: mandatory})
			if strings.HasPrefix(dst, "/proc/") {
				continue // over the child's own /proc only
			}
			rw, options := false, placeholderOptions
			if dst == "/tmp" {
				rw, options = true, scratchOptions
			}
			m.Set(field(m, "rw"), protoreflect.ValueOfBool(rw))
			m.Set(field(m, "options"), protoreflect.ValueOfString(options))
		case strings.HasPrefix(dst, "/proc"):
			return fs, fmt.Errorf("mount of %s: a fork server's child cannot make this kind of mount under /proc", dst)
		}
		kept.Append(protoreflect.ValueOfMessage(m))
	}
	cfg.Set(mountField, protoreflect.ValueOfList(kept))

	// The fork server needs no time namespace; each child makes its own, with the offsets nsjail cannot set.
	cfg.Clear(field(cfg, "clone_newtime"))
	for _, g := range messages(cfg, "gidmap") {
		inside := get(g, "inside_id").String()
		if fs.GID, err = strconv.Atoi(inside); err != nil {
			return fs, fmt.Errorf("gidmap inside_id %q: %w", inside, err)
		}
	}
	fs.Config = prototext.Format(cfg.Interface())
	return fs, nil
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
