package sandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/internal/proctree"
	"github.com/safe-py/safepy/internal/uids"
)

// hogHeader is shared by the hogs: once a hog has taken all it can, it starts a process whose command line carries
// the token (so the test sees from outside that the hog holds the resource) and keeps holding it.
const hogHeader = `import ctypes, os, signal, subprocess, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def holding(token):
    subprocess.Popen(["/usr/local/bin/python3", "-c", "import time; time.sleep(60)", token])
    time.sleep(60)
`

// Kernel resources that no cgroup counts, which one script could use up for every jail, and the server: each is
// refused by the seccomp policy or bounded per jail. For each, a hog takes all it can in one jail, and a probe in
// a concurrent jail must get exactly the answer it gets when it runs alone.
func TestKernelQuotasAreNotShared(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		tests := []struct {
			name, hog, probe string
			host             func() error // the same probe as root on the host, while the hog holds on; nil: none
		}{
			{"AIO contexts", `
def main(token):
    ctxs = []
    while len(ctxs) < 1000:
        ctx = ctypes.c_ulong(0)
        if libc.syscall(206, 4096, ctypes.byref(ctx)) != 0:  # io_setup: fs.aio-max-nr is 65536 events by default
            break
        ctxs.append(ctx)
    holding(token)
`, `import ctypes
def main():
    libc = ctypes.CDLL(None, use_errno=True)
    ctx = ctypes.c_ulong(0)
    r = libc.syscall(206, 1, ctypes.byref(ctx))
    return [r, ctypes.get_errno()]
`, func() error {
				var ctx uint64
				if _, _, e := unix.Syscall(unix.SYS_IO_SETUP, 1, uintptr(unsafePointer(&ctx)), 0); e != 0 {
					return e
				}
				unix.Syscall(unix.SYS_IO_DESTROY, uintptr(ctx), 0, 0)
				return nil
			}},
			{"inotify instances", `
def main(token):
    fds = []
    while len(fds) < 100000:
        fd = libc.inotify_init()
        if fd < 0:
            if ctypes.get_errno() == 24 and len(fds) > 200:  # this process's descriptors: go on in a child
                if os.fork() == 0:
                    fds = []
                    continue
            break
        fds.append(fd)
    holding(token)
`, `import ctypes, os
def main():
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init()
    return [fd >= 0, ctypes.get_errno() if fd < 0 else 0]
`, func() error {
				fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
				if err == nil {
					unix.Close(fd)
				}
				return err
			}},
			{"POSIX message queues", `
def main(token):
    libc.mq_open.restype = ctypes.c_int
    n = 0
    while n < 100000:
        if libc.mq_open(b"/hog%d" % n, os.O_CREAT | os.O_RDWR, 0o600, None) < 0:
            break
        n += 1
    holding(token)
`, `import ctypes, os
def main():
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.mq_open(b"/probe", os.O_CREAT | os.O_RDWR, 0o600, None)
    return [fd >= 0, ctypes.get_errno() if fd < 0 else 0]
`, nil},
			{"queued real-time signals", `
def main(token):
    # sigqueue, not kill: kill silently drops what does not fit, sigqueue says EAGAIN.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
    value = ctypes.c_void_p(0)
    for _ in range(200000):
        if libc.sigqueue(os.getpid(), signal.SIGRTMIN, value) != 0:
            break
    holding(token)
`, `import ctypes, os, signal
def main():
    libc = ctypes.CDLL(None, use_errno=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
    for sent in range(100):
        if libc.sigqueue(os.getpid(), signal.SIGRTMIN, ctypes.c_void_p(0)) != 0:
            return [sent, ctypes.get_errno()]
    return [100, 0]
`, nil},
			{"pipe buffers", `
import fcntl
def main(token):
    # Grow what can be grown, then open pipes until descriptors run out, in several processes.
    kids = []
    for _ in range(12):
        pid = os.fork()
        if pid == 0:
            pipes = []
            try:
                while True:
                    r, w = os.pipe()
                    pipes.append((r, w))
                    try:
                        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
                    except OSError:
                        pass
            except OSError:
                pass
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
    time.sleep(1)
    holding(token)
`, `import fcntl, os
def main():
    r, w = os.pipe()
    return fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
`, nil},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				alone, _ := mustRun(t, tt.probe)
				token := fmt.Sprintf("hog-%d-%d", os.Getpid(), time.Now().UnixNano())
				ctx, cancel := context.WithCancel(context.Background())
				hogDone := make(chan struct{})
				go func() {
					defer close(hogDone)
					runner.Run(ctx, []byte(hogHeader+tt.hog+fmt.Sprintf("\nmain_ = main\ndef main():\n    main_(%q)\n", token)))
				}()
				defer func() { cancel(); <-hogDone }()
				waitUntil(t, "the hog to hold all it can", func() bool { return len(proctree.Live(os.Getpid(), token)) > 0 })

				beside, _ := mustRun(t, tt.probe)
				if beside != alone {
					t.Errorf("beside the hog the probe gets %s; alone it gets %s", beside, alone)
				}
				if tt.host != nil {
					if err := tt.host(); err != nil {
						t.Errorf("root on the host, beside the hog: %v", err)
					}
				}
			})
		}
	})
}

// Each call the policy refuses for the quotas above answers EPERM, like the rest of the policy.
func TestQuotaCallsAreRefused(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, `import ctypes, fcntl, os
def main():
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for name, nr, args in (("io_setup", 206, (1, ctypes.byref(ctypes.c_ulong(0)))), ("inotify_init", 253, ()),
                           ("inotify_init1", 294, (0,)), ("fanotify_init", 300, (0, 0)),
                           ("mq_open", 240, (b"/x", os.O_CREAT | os.O_RDWR, 0o600, None)),
                           ("memfd_secret", 447, (0,)), ("mincore", 27, (0, 4096, 0)), ("cachestat", 451, (0, 0, 0, 0))):
        r = libc.syscall(nr, *args)
        out[name] = "allowed" if r >= 0 else ctypes.get_errno()
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, 1031, 1 << 20)
        out["F_SETPIPE_SZ"] = "allowed"
    except OSError as e:
        out["F_SETPIPE_SZ"] = e.errno
    out["F_GETPIPE_SZ"] = fcntl.fcntl(w, 1032)
    return out
`)
		want := `{"io_setup": 1, "inotify_init": 1, "inotify_init1": 1, "fanotify_init": 1, "mq_open": 1, "memfd_secret": 1, "mincore": 1, "cachestat": 1, "F_SETPIPE_SZ": 1, "F_GETPIPE_SZ": 65536}`
		if got != want {
			t.Fatalf("got  %s\nwant %s", got, want)
		}
	})
}

// Every resource limit a jail's process has is the one nsjail.cfg (or, where nsjail has no field for it, the
// harness's pinned list) declares: the file and the jail cannot drift apart.
func TestRlimitsAreWhatTheConfigDeclares(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, `import resource
def main():
    return {n: list(resource.getrlimit(getattr(resource, n))) for n in dir(resource) if n.startswith("RLIMIT_")}
`)
		var inJail map[string][2]int64
		if err := json.Unmarshal([]byte(got), &inJail); err != nil {
			t.Fatal(err)
		}
		asUint := func(v int64) uint64 {
			if v == -1 { // Python's RLIM_INFINITY
				return Infinity
			}
			return uint64(v)
		}
		declared := runner.Limits().Rlimits
		if len(declared) < 10+len(jaildef.PinnedRlimits) { // nsjail's ten rlimit fields and the pinned ones
			t.Fatalf("only %d limits declared: %v", len(declared), declared)
		}
		for name, want := range declared {
			have, ok := inJail[name]
			if !ok {
				t.Errorf("%s: not in the jail's resource module", name)
				continue
			}
			soft, hard := asUint(have[0]), asUint(have[1])
			if name == "RLIMIT_CPU" {
				// Counted from the script's arrival: what the interpreter used before it, plus the declared seconds,
				// rounded up; SIGKILL one second after SIGXCPU.
				if soft < want.Soft || soft > want.Soft+2 || hard != soft+1 {
					t.Errorf("RLIMIT_CPU (%d, %d), want the declared %d s from the script's arrival", soft, hard, want.Soft)
				}
				continue
			}
			if soft != want.Soft || hard != want.Hard {
				t.Errorf("%s is (%d, %d) in the jail; nsjail.cfg declares (%d, %d)", name, soft, hard, want.Soft, want.Hard)
			}
		}
		t.Logf("not declared, inherited: %s", undeclared(inJail, declared))
	})
}

func undeclared(inJail map[string][2]int64, declared map[string]Rlimit) string {
	var out []string
	for name, v := range inJail {
		if _, ok := declared[name]; !ok {
			out = append(out, fmt.Sprintf("%s=%v", name, v))
		}
	}
	return strings.Join(out, " ")
}

// Each jail alive at once is a uid of its own outside, from the runner's block, never nobody: seen from the host,
// on the processes of three concurrent jails.
func TestEachJailIsAUserOfItsOwn(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		token := fmt.Sprintf("uid-%d-%d", os.Getpid(), time.Now().UnixNano())
		script := fmt.Sprintf("import subprocess, time\ndef main():\n    subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(30)', %q])\n    time.sleep(30)\n", token)
		ctx, cancel := context.WithCancel(context.Background())
		var done sync.WaitGroup
		for i := 0; i < 3; i++ {
			done.Add(1)
			go func() {
				defer done.Done()
				runner.Run(ctx, []byte(script))
			}()
		}
		defer func() { cancel(); done.Wait() }()
		var procs []proctree.Proc
		waitUntil(t, "three jails to run", func() bool { procs = proctree.Live(os.Getpid(), token); return len(procs) == 3 })
		seen := map[int]bool{}
		for _, p := range procs {
			if p.UID <= runner.uids.Base || p.UID >= runner.uids.Base+uids.BlockSize {
				t.Fatalf("a jail's process runs as uid %d outside, want one of the runner's block from %d", p.UID, runner.uids.Base)
			}
			seen[p.UID] = true
		}
		if len(seen) != 3 {
			t.Fatalf("three concurrent jails, outside uids %v", seen)
		}
	})
}

func unsafePointer(p *uint64) unsafe.Pointer { return unsafe.Pointer(p) }
