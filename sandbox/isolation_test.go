package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/safe-py/safepy/internal/proctree"
)

// Each test here attacks one isolation property with a script that tries its best and reports what it got.

func TestNoNetworkNotEvenLoopback(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		accepted := make(chan struct{}, 1)
		go func() {
			if c, err := ln.Accept(); err == nil {
				c.Close()
				accepted <- struct{}{}
			}
		}()
		port := ln.Addr().(*net.TCPAddr).Port
		script := fmt.Sprintf(`import socket, fcntl, struct
def main():
    out = {}
    for host in ("127.0.0.1", "::1", "localhost"):
        try:
            socket.create_connection((host, %d), timeout=1).close()
            out[host] = "connected"
        except OSError as e:
            out[host] = type(e).__name__
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH", b"lo", 0)))[1]
    out["lo_up"] = bool(flags & 1)
    out["interfaces"] = [name for _, name in socket.if_nameindex()]
    return out
`, port)
		got, _ := mustRun(t, script)
		var res map[string]any
		if err := json.Unmarshal([]byte(got), &res); err != nil {
			t.Fatal(err)
		}
		for _, host := range []string{"127.0.0.1", "::1", "localhost"} {
			if res[host] == "connected" {
				t.Errorf("the jail connected to %s", host)
			}
		}
		if res["lo_up"] != false {
			t.Errorf("loopback is up in the jail: %v", res)
		}
		if ifs := fmt.Sprint(res["interfaces"]); ifs != "[lo]" {
			t.Errorf("interfaces %s, want only the (down) loopback", ifs)
		}
		select {
		case <-accepted:
			t.Fatal("the server on the host's loopback accepted a connection from the jail")
		case <-time.After(100 * time.Millisecond):
		}
	})
}

func TestHostFilesAreInvisible(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		secretDir := t.TempDir()
		os.Chmod(secretDir, 0o755)
		secret := filepath.Join(secretDir, "secret.txt")
		if err := os.WriteFile(secret, []byte("hunter2"), 0o644); err != nil {
			t.Fatal(err)
		}
		repoFile, _ := filepath.Abs("../go.mod")
		home, _ := os.UserHomeDir()
		paths := []string{secret, repoFile, "/etc/passwd", "/etc/shadow", "/etc/hostname", filepath.Join(home, ".bashrc"),
			"/root", "/home", "/var/run/secrets", "/sys/class/net", "/usr/bin/python3", "/usr/share"}
		quoted, _ := json.Marshal(paths)
		got, _ := mustRun(t, fmt.Sprintf(`import os
def main():
    out = {}
    for p in %s:
        try:
            out[p] = open(p).read()[:20] if os.path.isfile(p) else ("dir" if os.path.isdir(p) else "absent")
        except OSError as e:
            out[p] = type(e).__name__
    out["/"] = sorted(os.listdir("/"))
    out["/usr"] = sorted(os.listdir("/usr"))
    return out
`, quoted))
		var res map[string]any
		if err := json.Unmarshal([]byte(got), &res); err != nil {
			t.Fatal(err)
		}
		for _, p := range paths {
			if res[p] != "absent" {
				t.Errorf("%s is visible in the jail: %v", p, res[p])
			}
		}
		if got := fmt.Sprint(res["/"]); got != "[bin dev lib lib64 proc safepy sandbox tmp usr]" {
			t.Errorf("jail root holds %s", got)
		}
		if got := fmt.Sprint(res["/usr"]); got != "[lib lib64 local]" {
			t.Errorf("jail /usr holds %s", got)
		}
	})
}

func TestServerEnvironmentIsInvisible(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		t.Setenv("SAFEPY_TEST_SECRET", "hunter2-env")
		got, _ := mustRun(t, `import os
def main():
    seen = dict(os.environ)
    for path in ("/proc/self/environ", "/proc/1/environ"):
        try:
            seen[path] = open(path, "rb").read().decode(errors="replace")
        except OSError as e:
            seen[path] = type(e).__name__
    return seen
`)
		if strings.Contains(got, "hunter2-env") {
			t.Fatalf("the server's environment reached the jail: %s", got)
		}
		var env map[string]string
		json.Unmarshal([]byte(got), &env)
		want := []string{"HOME", "LANG", "LD_LIBRARY_PATH", "MKL_NUM_THREADS", "MPLBACKEND", "MPLCONFIGDIR", "NUMEXPR_NUM_THREADS",
			"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH"}
		for _, k := range want {
			if _, ok := env[k]; !ok {
				t.Errorf("missing %s", k)
			}
		}
		if n := len(env) - 2; n != len(want) {
			t.Errorf("the jail's environment has %d variables, want exactly %v: %v", n, want, env)
		}
	})
}

func TestReadOnlyOutsideSandboxAndTmp(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, `import os
def main():
    out = {}
    for p in ("/x", "/usr/local/evil.py", os.__file__, "/usr/lib/x86_64-linux-gnu/x",
              "/safepy/harness.py", "/proc/sys/kernel/hostname", "/proc/loadavg", "/proc/stat", "/dev/null2", "/sandbox/ok", "/tmp/ok", "/dev/shm/ok"):
        try:
            with open(p, "a") as f:
                f.write("x")
            out[p] = "written"
        except OSError as e:
            out[p] = type(e).__name__
    return out
`)
		var res map[string]string
		json.Unmarshal([]byte(got), &res)
		for p, v := range res {
			writable := p == "/sandbox/ok" || p == "/tmp/ok" || p == "/dev/shm/ok"
			if (v == "written") != writable {
				t.Errorf("%s: %s", p, v)
			}
		}
	})
}

func TestNoPrivilege(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, `import os
def main():
    out = {"uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid()}
    for name, call in (("setuid0", lambda: os.setuid(0)), ("setgid0", lambda: os.setgid(0)),
                       ("chroot", lambda: os.chroot("/tmp")), ("chown", lambda: os.chown("/sandbox", 0, 0))):
        try:
            call()
            out[name] = "allowed"
        except OSError as e:
            out[name] = type(e).__name__
    status = open("/proc/self/status").read()
    out["caps"] = sorted({l.split()[1] for l in status.splitlines() if l.startswith(("CapEff", "CapPrm"))})
    out["no_new_privs"] = [l.split()[1] for l in status.splitlines() if l.startswith("NoNewPrivs")]
    return out
`)
		var res map[string]any
		json.Unmarshal([]byte(got), &res)
		if res["uid"] != 1000.0 || res["gid"] != 1000.0 || res["euid"] != 1000.0 {
			t.Errorf("ids: %v", res)
		}
		for _, k := range []string{"setuid0", "setgid0", "chroot", "chown"} {
			if res[k] == "allowed" {
				t.Errorf("%s was allowed", k)
			}
		}
		if fmt.Sprint(res["caps"]) != "[0000000000000000]" || fmt.Sprint(res["no_new_privs"]) != "[1]" {
			t.Errorf("capabilities %v, no_new_privs %v", res["caps"], res["no_new_privs"])
		}
		// Only uid 1000 is mapped. (What it is outside, a uid of its own from the runner's block, is seen from
		// outside: TestEachJailIsAUserOfItsOwn.)
		got, _ = mustRun(t, "def main():\n    return open('/proc/self/uid_map').read().split()\n")
		var m []string
		json.Unmarshal([]byte(got), &m)
		if len(m) != 3 || m[0] != "1000" || m[2] != "1" {
			t.Errorf("uid map %s, want 1000 and nothing else", got)
		}
	})
}

func TestHostProcessesAreInvisible(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, `import os
def main():
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return {"pids": pids, "me": os.getpid()}
`)
		var res struct {
			Pids []int `json:"pids"`
			Me   int   `json:"me"`
		}
		json.Unmarshal([]byte(got), &res)
		// PID 1 is the harness's init, PID 2 the script.
		if fmt.Sprint(res.Pids) != "[1 2]" || res.Me != 2 {
			t.Fatalf("the jail sees processes %v (it is %d)", res.Pids, res.Me)
		}
	})
}

// Nothing of one execution is there for the next: files, processes, or the process it started and detached.
func TestNothingSurvivesIntoTheNextRequest(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		token := "survivor-" + strconv.Itoa(os.Getpid())
		mustRun(t, fmt.Sprintf(`import os, subprocess, time
def main():
    open("/sandbox/left", "w").write("x")
    open("/tmp/left", "w").write("x")
    open("/dev/shm/left", "w").write("x")
    subprocess.Popen(["/usr/local/bin/python3", "-c",
                      "import os, time; os.setsid(); open('/tmp/up', 'w').close(); time.sleep(60)", %q],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Some that wake every process they can, all the time: stopping the jail's processes one by one is not enough.
    for i in range(3):
        subprocess.Popen(["/usr/local/bin/python3", "-c",
                          "import os, signal\nopen('/tmp/waker%%d', 'w').close()\nwhile True: os.kill(-1, signal.SIGCONT)" %% i, %q],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not all(os.path.exists(p) for p in ("/tmp/up", "/tmp/waker0", "/tmp/waker1", "/tmp/waker2")):
        time.sleep(0.01)
    return "started"
`, token, token))
		// By the time the answer is back, every process of the jail has been stopped (it is killed just after)
		// or killed (the kernel may still be reaping it), and it is gone soon after.
		for _, p := range processesWith(token) {
			pid := strings.SplitN(p, ":", 2)[0]
			if status, ok := running("/proc/" + pid); ok {
				t.Fatalf("a detached process of the last request is still running after its answer: %s\n%s", p, status)
			}
		}
		waitUntil(t, "the killed processes to be reaped", func() bool { return len(processesWith(token)) == 0 })
		got, _ := mustRun(t, `import os
def main():
    return [os.path.exists(p) for p in ("/sandbox/left", "/tmp/left", "/dev/shm/left")] + [os.listdir("/sandbox"), os.listdir("/tmp")]
`)
		// (/tmp/.matplotlib is the harness's own: matplotlib's config directory, made fresh in every jail.)
		if got != `[false, false, false, [], [".matplotlib"]]` {
			t.Fatalf("files survived into the next request: %s", got)
		}
	})
}

// A process whose main thread has ended shows Z in /proc/PID/stat while its other threads run on: stopping the
// jail must look at every thread. (Found by an independent attack on the stop-then-kill answer.)
func TestNoThreadRunsAfterTheAnswer(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		token := "zombie-leader-" + strconv.Itoa(os.Getpid())
		child := `import ctypes, os, signal, threading, time
def spin():
    while open('/proc/%d/stat' % os.getpid()).read().rsplit(')', 1)[1].split()[0] != 'Z':
        time.sleep(0.001)
    open('/tmp/ready', 'w').close()
    while True:
        try:
            os.kill(-1, signal.SIGCONT)
        except OSError:
            pass
threading.Thread(target=spin).start()
time.sleep(0.05)
ctypes.CDLL(None).pthread_exit(None)
`
		mustRun(t, fmt.Sprintf(`import os, subprocess, time
def main():
    subprocess.Popen(["/usr/local/bin/python3", "-c", %q, %q], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists("/tmp/ready"):
        time.sleep(0.01)
    return "started"
`, child, token))
		tasks, _ := filepath.Glob("/proc/[0-9]*/task/[0-9]*")
		for _, task := range tasks {
			cmdline, err := os.ReadFile(task + "/cmdline")
			if err != nil || !strings.Contains(string(cmdline), token) {
				continue
			}
			if status, ok := running(task); ok {
				t.Fatalf("a thread of the last request runs after its answer: %s\n%s", task, status)
			}
		}
	})
}

// running reports whether the process or thread whose /proc directory is dir is neither stopped, nor ending, nor
// about to be either, and returns its status. A thread that has just taken its SIGSTOP off the pending set shows
// R for the instant before it stops: it counts as running only if it still does a moment later.
func running(dir string) (string, bool) {
	for i := 0; i < 2; i++ {
		status, err := os.ReadFile(dir + "/status")
		if err != nil || halted(string(status)) {
			return "", false
		}
		if i == 1 {
			return string(status), true
		}
		time.Sleep(2 * time.Millisecond)
	}
	return "", false
}

// halted reports whether a /proc/PID/status is of a process that is stopped, exiting, or has SIGKILL or SIGSTOP
// pending (either takes effect before it runs another instruction of its own).
func halted(status string) bool {
	for _, line := range strings.Split(status, "\n") {
		k, v, _ := strings.Cut(line, ":")
		v = strings.TrimSpace(v)
		switch k {
		case "State":
			if strings.HasPrefix(v, "Z") || strings.HasPrefix(v, "X") || strings.HasPrefix(v, "T") || strings.HasPrefix(v, "t") {
				return true
			}
		case "SigPnd", "ShdPnd":
			if mask, err := strconv.ParseUint(v, 16, 64); err == nil && mask&(1<<(9-1)|1<<(19-1)) != 0 { // SIGKILL, SIGSTOP
				return true
			}
		}
	}
	return false
}

// processesWith lists the live processes of this test's jails (this process's tree) whose command line
// contains s.
func processesWith(s string) []string {
	var found []string
	for _, p := range proctree.Live(os.Getpid(), s) {
		found = append(found, strconv.Itoa(p.PID)+": "+p.Cmdline)
	}
	return found
}

// /proc still has files about the whole machine. Those that show what neighbours do (the count of processes ever
// started, the load, memory in use, interrupts, disk and pressure counters, open files) or identify the host (boot
// id, uptime, command line) show fixed text; meminfo shows the jail's own memory limit.
func TestProcShowsNothingOfTheNeighbours(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, `import os
def main():
    def read(p):
        try:
            return open(p).read()
        except OSError as e:
            return type(e).__name__
    stat = read("/proc/stat")
    return {"processes": [l for l in stat.splitlines() if l.startswith("processes")],
            "loadavg": read("/proc/loadavg"), "uptime": read("/proc/uptime"),
            "boot_id": read("/proc/sys/kernel/random/boot_id"), "cmdline": read("/proc/cmdline"),
            "memtotal": [l.split()[1] for l in read("/proc/meminfo").splitlines() if l.startswith("MemTotal")],
            "file-nr": read("/proc/sys/fs/file-nr"), "vmstat": read("/proc/vmstat"),
            "interrupts": read("/proc/interrupts"), "pressure": sorted(os.listdir("/proc/pressure")),
            "cgroups": read("/proc/cgroups"),
            "cpu_count": os.cpu_count(), "self": read("/proc/self/status")[:5]}
`)
		var res struct {
			Processes  []string `json:"processes"`
			Loadavg    string   `json:"loadavg"`
			Uptime     string   `json:"uptime"`
			BootID     string   `json:"boot_id"`
			Cmdline    string   `json:"cmdline"`
			MemTotal   []string `json:"memtotal"`
			FileNr     string   `json:"file-nr"`
			Vmstat     string   `json:"vmstat"`
			Interrupts string   `json:"interrupts"`
			Pressure   []string `json:"pressure"`
			Cgroups    string   `json:"cgroups"`
			CPUCount   int      `json:"cpu_count"`
			Self       string   `json:"self"`
		}
		if err := json.Unmarshal([]byte(got), &res); err != nil {
			t.Fatal(err)
		}
		hostBoot, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
		for name, v := range map[string]string{"processes": fmt.Sprint(res.Processes), "loadavg": res.Loadavg,
			"uptime": res.Uptime, "boot_id": res.BootID, "cmdline": res.Cmdline, "file-nr": res.FileNr,
			"vmstat": res.Vmstat, "interrupts": res.Interrupts, "pressure": fmt.Sprint(res.Pressure), "cgroups": res.Cgroups} {
			want := map[string]string{"processes": "[processes 0]", "loadavg": "0.00 0.00 0.00 1/1 1\n", "uptime": "0.00 0.00\n",
				"boot_id": "00000000-0000-0000-0000-000000000000\n", "cmdline": "\n", "file-nr": "0\t0\t0\n",
				"vmstat": "\n", "interrupts": "\n", "pressure": "[]",
				"cgroups": "#subsys_name\thierarchy\tnum_cgroups\tenabled\n"}[name]
			if v != want {
				t.Errorf("%s in the jail: %q, want the fixed %q", name, v, want)
			}
		}
		if string(hostBoot) == res.BootID {
			t.Error("the jail sees the host's boot id")
		}
		if fmt.Sprint(res.MemTotal) != fmt.Sprintf("[%d]", runner.Limits().MemoryBytes>>10) {
			t.Errorf("MemTotal %v kB, want the jail's limit of %d bytes (the meminfo text the sandbox derives from cgroup_mem_max is not what the jail sees)",
				res.MemTotal, runner.Limits().MemoryBytes)
		}
		if res.CPUCount < 1 || res.Self != "Name:" {
			t.Errorf("what a script needs of /proc broke: cpu_count %d, /proc/self/status %q", res.CPUCount, res.Self)
		}
	})
}

// A jail is a session and process group of its own: kill(0, sig) reaches its own processes only. Forked jails
// once shared the fork server's session, so a script could kill its own supervisor (a 500) and wake a stopped
// sibling with SIGCONT (a channel between requests).
func TestSignalsStayInTheJail(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, "import os\ndef main():\n    return [os.getpgrp(), os.getsid(0)]\n")
		if got != "[1, 1]" {
			t.Fatalf("process group and session %s, want the jail's init's [1, 1]", got)
		}
		mustFail(t, "import os, signal\ndef main():\n    os.kill(0, signal.SIGKILL)\n", ExecutionError, "")

		// A stops itself; B, concurrent, sends SIGCONT to its own process group for a second. A must stay stopped
		// until its deadline.
		var wg sync.WaitGroup
		wg.Add(1)
		var stoppedErr error
		go func() {
			defer wg.Done()
			_, stoppedErr = run(t, "import os, signal, time\ndef main():\n    os.kill(os.getpid(), signal.SIGSTOP)\n    return 'woken'\n")
		}()
		time.Sleep(300 * time.Millisecond)
		mustRun(t, "import os, signal, time\ndef main():\n    end = time.time() + 1\n    while time.time() < end:\n        os.kill(0, signal.SIGCONT)\n    return 1\n")
		wg.Wait()
		var se *ScriptError
		if !errors.As(stoppedErr, &se) || se.Kind != TimeoutError {
			t.Fatalf("a stopped script next to one sending SIGCONT to its group: %v", stoppedErr)
		}
	})
}

// A jail's clocks start with the jail: its boot-time and monotonic clocks, its processes' start times (the 22nd
// field of /proc/PID/stat, in ticks since boot) and the uptime sysinfo reports count from the jail's making, not
// the host's boot. Every jail of these runners was made after TestMain began, so none of them may read more than
// has passed since (and the host had been up for longer than that by far).
func TestJailClocksStartWithTheJail(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, `import ctypes, os, time
def main():
    class Sysinfo(ctypes.Structure):
        _fields_ = [("uptime", ctypes.c_long), ("pad", ctypes.c_char * 256)]
    info = Sysinfo()
    ctypes.CDLL(None).sysinfo(ctypes.byref(info))
    tick = os.sysconf("SC_CLK_TCK")
    start = lambda pid: int(open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()[19]) / tick
    return {"boottime": time.clock_gettime(time.CLOCK_BOOTTIME), "monotonic": time.clock_gettime(time.CLOCK_MONOTONIC),
            "self_start": start("self"), "init_start": start(1), "sysinfo": info.uptime}
`)
		var clocks map[string]float64
		if err := json.Unmarshal([]byte(got), &clocks); err != nil {
			t.Fatal(err)
		}
		since := hostBoottime() - testsBegan
		if testsBegan < 10 {
			t.Fatalf("the host was up %.1f s when the tests began: too little to tell its clocks from a jail's", testsBegan)
		}
		for name, v := range clocks {
			if v > since+1 {
				t.Errorf("%s in the jail: %.2f s, more than the %.2f s since the tests began (the host has been up %.0f s)",
					name, v, since, hostBoottime())
			}
		}
	})
}

// hostBoottime is the host's CLOCK_BOOTTIME in seconds.
func hostBoottime() float64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	return float64(ts.Sec) + float64(ts.Nsec)/1e9
}
