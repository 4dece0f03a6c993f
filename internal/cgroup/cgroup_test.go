package cgroup

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseCounter(t *testing.T) {
	for _, tt := range []struct {
		name, text, key string
		want            int64
	}{
		{"v2 memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n", "oom_kill", 1},
		{"v2 no kill", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n", "oom_kill", 0},
		{"v1 memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill", 3},
		{"a prefix is not the key", "oom_kill_disable 1\n", "oom_kill", 0},
		{"pids.events", "max 5\n", "max", 5},
		{"missing", "", "max", 0},
		{"no newline at the end", "file 4096", "file", 4096},
		{"garbage value", "max lots\n", "max", 0},
	} {
		if got := parseCounter([]byte(tt.text), tt.key); got != tt.want {
			t.Errorf("%s: %d, want %d", tt.name, got, tt.want)
		}
	}
}

func TestHeld(t *testing.T) {
	for _, tt := range []struct {
		name, stat, fileKey string
		usage, want         int64
	}{
		{"v2", "anon 100\nfile 300\nshmem 50\nslab_reclaimable 20\n", "file", 1000, 1000 - (300 - 50 + 20)},
		{"v1 has no slab count", "cache 300\nrss 100\nshmem 100\n", "cache", 1000, 800},
		{"v1 reads cache, not file", "cache 300\nfile 999\n", "cache", 1000, 700},
		{"tmpfs beyond the cache never adds", "file 10\nshmem 50\n", "file", 1000, 1000},
		{"no stat", "", "file", 1000, 1000},
	} {
		if got := held(tt.usage, []byte(tt.stat), tt.fileKey); got != tt.want {
			t.Errorf("%s: %d, want %d", tt.name, got, tt.want)
		}
	}
}

func TestParseMounts(t *testing.T) {
	const mountinfo = `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:14 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpu,cpuacct
broken line without separator
32 25 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
`
	got, err := parseMounts(strings.NewReader(mountinfo))
	if err != nil {
		t.Fatal(err)
	}
	want := []mount{
		{"cgroup2", "/sys/fs/cgroup/unified", map[string]bool{"rw": true, "nsdelegate": true}},
		{"cgroup", "/sys/fs/cgroup/memory", map[string]bool{"rw": true, "memory": true}},
		{"cgroup", "/sys/fs/cgroup/cpu,cpuacct", map[string]bool{"rw": true, "cpu": true, "cpuacct": true}},
		{"cgroup", "/sys/fs/cgroup/pids", map[string]bool{"rw": true, "pids": true}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

func TestParseOwn(t *testing.T) {
	for _, tt := range []struct {
		name, text string
		want       map[string]string
	}{
		{"v2", "0::/system.slice/safepy.service\n", map[string]string{"": "/system.slice/safepy.service"}},
		{"v1", "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n",
			map[string]string{"pids": "/docker/abc", "cpu": "/docker/abc", "cpuacct": "/docker/abc",
				"memory": "/docker/abc", "name=systemd": "/docker/abc", "": "/"}},
		{"a path with a colon", "0::/a:b\n", map[string]string{"": "/a:b"}},
	} {
		if got := parseOwn([]byte(tt.text)); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestCandidates(t *testing.T) {
	for _, tt := range []struct {
		want  string
		modes []Mode
		err   bool
	}{
		{"", []Mode{V2, V1}, false},
		{"auto", []Mode{V2, V1}, false},
		{"v1", []Mode{V1}, false},
		{"v2", []Mode{V2}, false},
		{"none", nil, false},
		{"v3", nil, true},
	} {
		got, err := candidates(tt.want)
		if !reflect.DeepEqual(got, tt.modes) || (err != nil) != tt.err {
			t.Errorf("%q: %v %v", tt.want, got, err)
		}
	}
}

// fakeHost writes a mountinfo and a /proc/self/cgroup for a host whose cgroup file systems are directories
// under root (plain directories: files written there are only files).
func fakeHost(t *testing.T, mountinfo, own string) (mountPath, ownPath string) {
	t.Helper()
	dir := t.TempDir()
	mountPath, ownPath = filepath.Join(dir, "mountinfo"), filepath.Join(dir, "cgroup")
	if err := os.WriteFile(mountPath, []byte(mountinfo), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ownPath, []byte(own), 0o644); err != nil {
		t.Fatal(err)
	}
	return mountPath, ownPath
}

// touch makes the files a cgroup directory has, which plain directories lack.
func touch(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// Which hierarchy a host offers, from its mountinfo and this process's cgroups; the probe (a real process in
// a real cgroup) is left out.
func TestSetup(t *testing.T) {
	root := t.TempDir()
	v2 := filepath.Join(root, "unified")
	v1 := func(c string) string { return filepath.Join(root, c) }
	self := fmt.Sprintf("1\n%d\n", os.Getpid())
	touch(t, filepath.Join(v2, "svc"), map[string]string{"cgroup.controllers": "cpuset cpu io memory pids\n", "cgroup.subtree_control": "", "cgroup.procs": self})
	touch(t, v2, map[string]string{"cgroup.controllers": "memory pids cpu\n", "cgroup.subtree_control": "", "cgroup.procs": self})
	touch(t, filepath.Join(v2, "safepy"), map[string]string{"cgroup.subtree_control": ""})
	touch(t, filepath.Join(v2, "svc/safepy"), map[string]string{"cgroup.subtree_control": ""})
	touch(t, filepath.Join(v2, "bare"), map[string]string{"cgroup.controllers": "", "cgroup.subtree_control": "", "cgroup.procs": self})
	touch(t, filepath.Join(v2, "other"), map[string]string{"cgroup.controllers": "memory pids cpu\n", "cgroup.subtree_control": "", "cgroup.procs": "1\n"})
	// Where an earlier server moved its cgroup's processes (this one's shell, say) into a leaf.
	touch(t, filepath.Join(v2, "run"), map[string]string{"cgroup.controllers": "memory pids cpu\n", "cgroup.subtree_control": v2Controllers})
	touch(t, filepath.Join(v2, "run/safepy"), map[string]string{"cgroup.subtree_control": ""})
	touch(t, filepath.Join(v2, "run/safepy-server"), map[string]string{"cgroup.controllers": "memory pids cpu\n", "cgroup.subtree_control": "", "cgroup.procs": self})
	for _, c := range []string{"memory", "pids", "cpu"} {
		touch(t, filepath.Join(v1(c), "docker"), nil)
	}
	v2Mount := "26 25 0:23 / " + v2 + " rw - cgroup2 cgroup2 rw\n"
	v1Mounts := "30 25 0:27 / " + v1("memory") + " rw - cgroup cgroup rw,memory\n" +
		"31 25 0:28 / " + v1("cpu") + " rw - cgroup cgroup rw,cpu,cpuacct\n" +
		"32 25 0:29 / " + v1("pids") + " rw - cgroup cgroup rw,pids\n"
	for _, tt := range []struct {
		name, mountinfo, own string
		mode                 Mode
		dirs                 []string // the runner's, less their PID-N
		err                  string
	}{
		// A plain directory made for the runner has no cgroup.subtree_control: setup got that far.
		{"v2 with its controllers", v2Mount, "0::/svc\n", V2, nil, "enabling controllers in " + filepath.Join(v2, "svc/safepy") + "/"},
		{"v2 in a cgroup namespace", v2Mount, "0::/gone\n", V2, nil, "enabling controllers in " + filepath.Join(v2, "safepy") + "/"},
		{"v2 without controllers", v2Mount, "0::/bare\n", V2, nil, "the memory controller is not available"},
		{"v2 in a cgroup this process is not in", v2Mount, "0::/other\n", V2, nil, "this process is not in " + filepath.Join(v2, "other")},
		{"v2 started again in its leaf", v2Mount, "0::/run/safepy-server\n", V2, nil, "enabling controllers in " + filepath.Join(v2, "run/safepy") + "/"},
		{"no cgroup2", v1Mounts, "0::/svc\n", V2, nil, "no cgroup2 file system is mounted"},
		{"v1", v1Mounts + v2Mount, "3:memory:/docker\n4:cpu,cpuacct:/docker\n12:pids:/docker\n0::/bare\n", V1,
			[]string{v1("memory/docker/safepy"), v1("pids/docker/safepy"), v1("cpu/docker/safepy")}, ""},
		{"v1 in a cgroup namespace", v1Mounts, "3:memory:/gone\n4:cpu,cpuacct:/gone\n12:pids:/gone\n", V1,
			[]string{v1("memory/safepy"), v1("pids/safepy"), v1("cpu/safepy")}, ""},
		{"v1 without pids", strings.Split(v1Mounts, "32 ")[0], "3:memory:/docker\n", V1, nil, "no cgroup v1 pids controller is mounted"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			mountPath, ownPath := fakeHost(t, tt.mountinfo, tt.own)
			mounts, err := readMounts(mountPath)
			if err != nil {
				t.Fatal(err)
			}
			m, err := setup(tt.mode, mounts, ownPath)
			if tt.err != "" {
				if m != nil || err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("got %v, %v; want an error with %q", m, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			var parents []string
			for _, d := range m.Dirs() {
				parents = append(parents, filepath.Dir(d))
			}
			if m.Mode() != tt.mode || !reflect.DeepEqual(parents, tt.dirs) {
				t.Fatalf("mode %s, dirs %v; want %s under %v", m.Mode(), m.Dirs(), tt.mode, tt.dirs)
			}
		})
	}
	if data, _ := os.ReadFile(filepath.Join(v2, "svc/cgroup.subtree_control")); string(data) != v2Controllers {
		t.Errorf("the service's cgroup hands on %q", data)
	}
}

// A cgroup that holds a process of another PID namespace (listed as 0) is not this server's to rearrange: moving
// "0" would move the server itself again, for ever.
func TestMoveProcessesRefusesOtherNamespaces(t *testing.T) {
	from, to := filepath.Join(t.TempDir(), "home"), filepath.Join(t.TempDir(), "leaf")
	touch(t, from, map[string]string{"cgroup.procs": "0\n"})
	touch(t, to, map[string]string{"cgroup.procs": ""})
	moved, err := moveProcesses(from, to)
	if err == nil || !strings.Contains(err.Error(), "another PID namespace") || len(moved) != 1 {
		t.Fatalf("moved %v, %v; want only this process moved (to be put back) and a refusal", moved, err)
	}
}

// A jail's cgroup on a fake v2 host: its limits, its numbers, its events, its processes.
func TestV2Cgroup(t *testing.T) {
	m := &v2Manager{dir: filepath.Join(t.TempDir(), "safepy", "1-1")}
	if err := os.MkdirAll(m.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(m.dir, "jail")
	c := &v2Cgroup{dir: dir}
	// What the kernel makes in a new cgroup's directory; memory.swap.max is missing (no swap accounting).
	touch(t, dir, map[string]string{"memory.max": "", "pids.max": "", "cpu.max": "", "memory.current": "1000\n",
		"memory.peak": "5000\n", "memory.stat": "file 300\nshmem 100\nslab_reclaimable 50\n",
		"memory.events": "oom 1\noom_kill 1\n", "pids.events": "max 0\n", "cgroup.procs": "12\n34\nx\n"})
	noSwap(t)
	err := applySettings([][2]string{{dir + "/memory.max", "200"}, {dir + "/memory.swap.max", "0"}, {dir + "/pids.max", "66"}})
	if err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(dir + "/pids.max"); string(data) != "66" {
		t.Fatalf("pids.max %q", data)
	}
	if err := applySettings([][2]string{{dir + "/cpu.weight", "1"}}); err == nil {
		t.Fatal("a missing limit that is not swap's was skipped")
	}
	if got := c.MemoryUsage(); got != 1000 {
		t.Errorf("usage %d", got)
	}
	if got := c.MemoryPeak(); got != 5000 {
		t.Errorf("peak %d", got)
	}
	if got := c.MemoryHeld(); got != 1000-(300-100+50) {
		t.Errorf("held %d", got)
	}
	if oom, pids := c.Events(); !oom || pids {
		t.Errorf("events %v %v", oom, pids)
	}
	if got := c.Procs(); !reflect.DeepEqual(got, []int{12, 34}) {
		t.Errorf("procs %v", got)
	}
}

// Rlimits mode has nothing to do and says so, without failing.
func TestNone(t *testing.T) {
	m, err := Detect("none", Limits{}, "/nonexistent", 1<<30)
	if err != nil || m.Mode() != None || m.Dirs() != nil {
		t.Fatalf("%v %v", m, err)
	}
	c, err := m.Create("jail", Limits{MemoryBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("true")
	if err := c.Start(cmd, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	files, err := c.ProcsFiles()
	oom, pids := c.Events()
	if files != nil || err != nil || c.Procs() != nil || c.Contains(os.Getpid()) || c.MemoryPeak() != 0 ||
		c.MemoryUsage() != 0 || c.MemoryHeld() != 0 || oom || pids || c.Dirs() != nil || c.Remove() != nil {
		t.Fatal("rlimits mode reported something")
	}
	c.Kill()
	m.Close()
}

// A setup that changes the forking thread for good keeps that thread from the runtime until the child ends (its
// parent-death signal follows the thread); one that fails starts nothing.
func TestStartSetup(t *testing.T) {
	ran := false
	ended := make(chan struct{})
	cmd := exec.Command("true")
	if err := (none{}).Start(cmd, func() error { ran = true; return nil }, ended); err != nil || !ran {
		t.Fatalf("%v ran=%v", err, ran)
	}
	_ = cmd.Wait()
	close(ended)
	cmd = exec.Command("true")
	if err := (none{}).Start(cmd, func() error { return os.ErrPermission }, nil); err != os.ErrPermission || cmd.Process != nil {
		t.Fatalf("%v %v", err, cmd.Process)
	}
}

// The memory a server may use is bounded by every cgroup above its own, not by the mount's top: a systemd unit's
// MemoryMax= on a large host, a slice's limit, a container's.
func TestMemoryLimit(t *testing.T) {
	root := t.TempDir()
	v2, mem := filepath.Join(root, "unified"), filepath.Join(root, "memory")
	touch(t, v2, map[string]string{"cgroup.controllers": "memory pids cpu\n"}) // the host's top has no memory.max
	touch(t, filepath.Join(v2, "system.slice"), map[string]string{"memory.max": "3221225472\n"})
	touch(t, filepath.Join(v2, "system.slice/safepy.service"), map[string]string{"memory.max": "2147483648\n"})
	touch(t, filepath.Join(v2, "system.slice/safepy.service/safepy-server"), map[string]string{"memory.max": "max\n"})
	touch(t, filepath.Join(v2, "user.slice"), map[string]string{"memory.max": "max\n"})
	touch(t, mem, map[string]string{"memory.limit_in_bytes": "9223372036854771712\n"})
	touch(t, filepath.Join(mem, "docker"), map[string]string{"memory.limit_in_bytes": "1073741824\n"})
	touch(t, filepath.Join(mem, "docker/app"), map[string]string{"memory.limit_in_bytes": "9223372036854771712\n"})
	v2Mount := "26 25 0:23 / " + v2 + " rw - cgroup2 cgroup2 rw\n"
	v1Mount := "30 25 0:27 / " + mem + " rw - cgroup cgroup rw,memory\n"
	for _, tt := range []struct {
		name, mountinfo, own string
		want                 int64
	}{
		{"v2: the unit's, below its slice's", v2Mount, "0::/system.slice/safepy.service/safepy-server\n", 2 << 30},
		{"v2: none set anywhere", v2Mount, "0::/user.slice\n", 0},
		{"v2: behind a cgroup namespace, the namespace's top", v2Mount, "0::/\n", 0},
		{"v2: a path outside the mount is not followed", v2Mount, "0::/../../x\n", 0},
		{"v1: the container's, above its own", v1Mount, "4:memory:/docker/app\n", 1 << 30},
		{"v1 and v2 both mounted: the lowest", v1Mount + v2Mount, "4:memory:/docker/app\n0::/system.slice/safepy.service\n", 1 << 30},
	} {
		t.Run(tt.name, func(t *testing.T) {
			mountPath, ownPath := fakeHost(t, tt.mountinfo, tt.own)
			if got := memoryLimit(mountPath, ownPath); got != tt.want {
				t.Fatalf("got %d, want %d", got, tt.want)
			}
		})
	}
}

// noSwap has the package see a machine with no swap on, for tests of a kernel without swap accounting.
func noSwap(t *testing.T) {
	fake := filepath.Join(t.TempDir(), "swaps")
	os.WriteFile(fake, []byte("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"), 0o644)
	old := swapsFile
	swapsFile = fake
	t.Cleanup(func() { swapsFile = old })
}

// Swap that the kernel does not account per cgroup is a way past a jail's memory limit: a jail's cgroup is not
// made where swap is on and its limit cannot be set. With no swap on, there is nothing to limit.
func TestSwapWithoutAccounting(t *testing.T) {
	const header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
	for _, tt := range []struct {
		name, swaps string // "" : no such file
		ok          bool
	}{
		{"no swap on", header, true},
		{"a swap file on", header + "/swapfile                               file\t\t4194300\t\t0\t\t-2\n", false},
		{"cannot tell", "", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			swapsFile = filepath.Join(dir, "swaps")
			t.Cleanup(func() { swapsFile = "/proc/swaps" })
			if tt.swaps != "" {
				os.WriteFile(swapsFile, []byte(tt.swaps), 0o644)
			}
			touch(t, filepath.Join(dir, "jail"), map[string]string{"memory.max": ""}) // no memory.swap.max
			for _, missing := range []string{"memory.swap.max", "memory.memsw.limit_in_bytes", "memory.swappiness"} {
				err := applySettings([][2]string{{dir + "/jail/memory.max", "200"}, {dir + "/jail/" + missing, "0"}})
				if (err == nil) != tt.ok {
					t.Errorf("%s missing: %v, want ok=%v", missing, err, tt.ok)
				}
			}
		})
	}
}
