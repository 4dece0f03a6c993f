package jaildef

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"
)

// The schema is the installed nsjail's, as in the service; whether nsjail accepts the derived configs is for the
// sandbox's real-jail tests, which start jails from them.
func nsjailPath() string {
	rt := os.Getenv("SAFEPY_RUNTIME_DIR")
	if rt == "" {
		rt = "../../.runtime"
	}
	return filepath.Join(rt, "bin", "nsjail")
}

func readCfg(t *testing.T) (protoreflect.MessageDescriptor, string) {
	t.Helper()
	md, err := readSchema(nsjailPath())
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile("../../nsjail.cfg")
	if err != nil {
		t.Fatal(err)
	}
	return md, string(data)
}

// edit changes one line of nsjail.cfg, which must be there.
func edit(t *testing.T, cfg, old, new string) string {
	t.Helper()
	if !strings.Contains(cfg, old) {
		t.Fatalf("nsjail.cfg has no %q", old)
	}
	return strings.Replace(cfg, old, new, 1)
}

func TestRead(t *testing.T) {
	md, cfg := readCfg(t)
	for _, c := range []struct {
		name    string
		cfg     string
		wantErr string
	}{
		{"nsjail.cfg", cfg, ""},
		{"unknown field", cfg + "\nno_such_field: true\n", "no_such_field"},
		{"unknown field in a mount", edit(t, cfg, `dst: "/tmp" fstype: "tmpfs"`, `dst: "/tmp" fstype: "tmpfs" size: 1`), "size"},
		{"missing limit", edit(t, cfg, "\ncgroup_pids_max: 64\n", "\n"), "cgroup_pids_max is not set"},
		{"zero limit", edit(t, cfg, "\ntime_limit: 3\n", "\ntime_limit: 0\n"), "time_limit must be a positive"},
		{"rlimit type left to nsjail", edit(t, cfg, "\nrlimit_stack_type: VALUE\n", "\n"), "rlimit_stack_type must be VALUE or INF"},
		{"rlimit from the server", edit(t, cfg, "\nrlimit_stack_type: VALUE\n", "\nrlimit_stack_type: SOFT\n"), "rlimit_stack_type must be VALUE or INF"},
		{"rlimit value missing", edit(t, cfg, "\nrlimit_nofile: 256\n", "\n"), "rlimit_nofile is not set"},
		{"rlimit_nproc below the cgroup", edit(t, cfg, "\nrlimit_nproc: 128\n", "\nrlimit_nproc: 66\n"), "rlimit_nproc (66) must be above"},
		{"uidmap", cfg + "\nuidmap { inside_id: \"1000\" outside_id: \"1000\" }\n", "uidmap must not be set"},
		{"tmpfs without inodes", edit(t, cfg, "size=33554432,nr_inodes=4096,mode=0777", "size=33554432,mode=0777"), "nr_inodes="},
		{"meminfo typed by hand", edit(t, cfg, `dst: "/proc/meminfo"`, `dst: "/proc/meminfo" src_content: "MemTotal: 1 kB\n"`), "must not write its content"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := parse(md, []byte(c.cfg))
			switch {
			case c.wantErr == "" && err != nil:
				t.Fatal(err)
			case c.wantErr != "" && (err == nil || !strings.Contains(err.Error(), c.wantErr)):
				t.Fatalf("got %v, want an error about %q", err, c.wantErr)
			}
		})
	}
}

func TestLimits(t *testing.T) {
	d, err := Read(nsjailPath(), "../../nsjail.cfg")
	if err != nil {
		t.Fatal(err)
	}
	l := d.Limits()
	if l.Wall.Seconds() != 3 || l.MemoryBytes != 256<<20 || l.Processes != 64 || l.TmpfsBytes != 32<<20 || l.TmpfsInodes != 4096 {
		t.Errorf("limits %+v are not nsjail.cfg's", l)
	}
	for name, want := range map[string]Rlimit{"RLIMIT_AS": {Infinity, Infinity}, "RLIMIT_STACK": {8 << 20, 8 << 20},
		"RLIMIT_MEMLOCK": {0, 0}, "RLIMIT_NPROC": {128, 128}, "RLIMIT_SIGPENDING": {128, 128}} {
		if l.Rlimits[name] != want {
			t.Errorf("%s: %v, want %v", name, l.Rlimits[name], want)
		}
	}
	l.Rlimits["RLIMIT_AS"] = Rlimit{1, 1}
	if d.Limits().Rlimits["RLIMIT_AS"] != (Rlimit{Infinity, Infinity}) {
		t.Error("a caller's change to its limits reached the definition")
	}
}

// The derived configs are nsjail.cfg but for what each path does itself, and /proc/meminfo tells the jail's limit.
func TestDerivedConfigs(t *testing.T) {
	md, cfg := readCfg(t)
	for _, memory := range []int64{256 << 20, 1 << 30} {
		d, err := parse(md, []byte(edit(t, cfg, "\ncgroup_mem_max: 268435456\n", fmt.Sprintf("\ncgroup_mem_max: %d\n", memory))))
		if err != nil {
			t.Fatal(err)
		}
		if !d.TimeNamespace() || d.Hostname() != "sandbox" || d.Cwd() != "/sandbox" {
			t.Errorf("time namespace %v, hostname %q, cwd %q", d.TimeNamespace(), d.Hostname(), d.Cwd())
		}
		fs, err := d.ForkServer()
		if err != nil {
			t.Fatal(err)
		}
		wantMeminfo := fmt.Sprintf("MemTotal:       %8d kB\n", memory>>10)
		for name, text := range map[string]string{"cold": d.ColdConfig(), "fork server": fs.Config} {
			back := dynamicpb.NewMessage(md)
			if err := prototext.Unmarshal([]byte(text), back); err != nil {
				t.Fatalf("%s config does not read back: %v", name, err)
			}
			if back.Has(field(back, "clone_newtime")) {
				t.Errorf("%s config has clone_newtime: the sandbox makes the time namespace", name)
			}
			var meminfo string
			for _, m := range messages(back, "mount") {
				if get(m, "dst").String() == meminfoPath {
					meminfo = string(get(m, "src_content").Bytes())
				}
			}
			if name == "cold" && !strings.HasPrefix(meminfo, wantMeminfo) {
				t.Errorf("cold config's meminfo %q, want it to start %q", meminfo, wantMeminfo)
			}
			if name == "fork server" && meminfo != "" {
				t.Errorf("the fork server mounts meminfo's text itself (%q): its children would not see /proc whole", meminfo)
			}
		}
		var masked bool
		for _, m := range fs.Mounts {
			if m.Dst == meminfoPath {
				i, err := strconv.Atoi(strings.TrimPrefix(m.Src, MaskDir+"/"))
				masked = err == nil && m.Kind == "bind" && i < len(fs.Masks) && strings.HasPrefix(fs.Masks[i], wantMeminfo)
			}
		}
		if !masked {
			t.Errorf("a forked jail's meminfo is not the limit's text: %+v", fs.Mounts)
		}
		if fs.GID != 1000 || !strings.Contains(fs.Config, "safepy_forkserver") {
			t.Errorf("fork server gid %d, policy relaxed %v", fs.GID, strings.Contains(fs.Config, "safepy_forkserver"))
		}
	}
}

func TestForkServerPolicy(t *testing.T) {
	got, err := forkServerPolicy("POLICY p { ALLOW { read } }\nUSE p DEFAULT ERRNO(38)")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(got, "USE safepy_forkserver, USE p DEFAULT ERRNO(38)") {
		t.Errorf("got %q", got)
	}
	if _, err := forkServerPolicy("POLICY p { ALLOW { read } }"); err == nil {
		t.Error("a policy without USE was taken")
	}
}
