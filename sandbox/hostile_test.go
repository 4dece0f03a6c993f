package sandbox

import (
	"context"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// Scripts written to hurt. Each must end with a clear outcome, and the runner must serve the next script.
func TestHostileScripts(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		tests := []struct {
			name   string
			script string
			kind   Kind   // "" means main() returns normally
			limit  Limit  // for limit errors
			want   string // the result, or a part of the error message
		}{
			// Time
			{"endless loop", "def main():\n    while True:\n        pass\n", TimeoutError, LimitWall, ""},
			{"sleep", "import time\ndef main():\n    time.sleep(60)\n", TimeoutError, LimitWall, ""},
			{"catches every exception", "def main():\n    while True:\n        try:\n            while True:\n                pass\n        except BaseException:\n            pass\n", TimeoutError, LimitWall, ""},
			{"threads outlive main", "import threading, time\ndef main():\n    for _ in range(4):\n        threading.Thread(target=time.sleep, args=(60,)).start()\n    return 'returned'\n", "", "", `"returned"`},
			{"CPU time in many processes", "import multiprocessing\ndef spin(_):\n    while True:\n        pass\ndef main():\n    with multiprocessing.Pool(4) as p:\n        p.map(spin, range(4))\n", TimeoutError, "", ""},

			// Memory
			{"many small allocations", "def main():\n    xs = []\n    while True:\n        xs.append(' ' * 1000)\n", ResourceLimitError, LimitMemory, "memory limit of 256 MiB"},
			{"one huge allocation", "def main():\n    return len(bytearray(1 << 40))\n", ResourceLimitError, LimitMemory, "memory limit of 256 MiB"},
			{"numpy over the limit", "import numpy as np\ndef main():\n    return int(np.ones(300 << 20, dtype=np.uint8).sum())\n", ResourceLimitError, LimitMemory, "memory limit of 256 MiB"},
			{"memory in tmpfs", "def main():\n    for i in range(40):\n        open('/dev/shm/f%d' % i, 'wb').write(b'x' * (8 << 20))\n", ResourceLimitError, "", ""},

			// Processes
			{"fork bomb", "import os\ndef main():\n    while True:\n        os.fork()\n", ResourceLimitError, LimitProcesses, "process limit of 64"},
			{"multiprocessing loop", "import multiprocessing, time\ndef main():\n    ps = []\n    for _ in range(200):\n        p = multiprocessing.Process(target=time.sleep, args=(30,))\n        p.start()\n        ps.append(p)\n", ResourceLimitError, LimitProcesses, "process limit of 64"},
			{"threads are processes too", "import threading, time\ndef main():\n    ts = [threading.Thread(target=time.sleep, args=(30,), daemon=True) for _ in range(200)]\n    for t in ts:\n        t.start()\n", ResourceLimitError, LimitProcesses, "process limit of 64"},
			{"64 processes are the script's own", "import subprocess\ndef main():\n    ps = [subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(30)']) for _ in range(63)]\n    return len(ps) + 1\n", "", "", "64"},
			{"a source that breaks the compiler", "x = " + strings.Repeat("-", 300000) + "1\n", ExecutionError, "", "MemoryError"}, // the parser's stack, not the jail's memory

			// Output
			{"100 MiB of stdout", "import os\ndef main():\n    chunk = b'x' * (1 << 20)\n    for _ in range(100):\n        os.write(1, chunk)\n    return 'ok'\n", "", "", `"ok"`},
			{"one 50 MiB line", "def main():\n    print('y' * (50 << 20))\n    return 'ok'\n", "", "", `"ok"`},
			{"100 MiB result", "def main():\n    return 'z' * (100 << 20)\n", ResourceLimitError, "", ""},
			{"result nested 100000 deep", "def main():\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n", SerializationError, "", "main() must return JSON-serializable data"},
			{"deep result with a raised recursion limit", "import sys\ndef main():\n    sys.setrecursionlimit(10**6)\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n", SerializationError, "", "main() must return JSON-serializable data"},
			{"writes over the result channel", "import os\ndef main():\n    os.write(4, b'garbage')\n    return 1\n", ExecutionError, "", "result channel"},

			// Files
			{"a file over 10 MiB", "def main():\n    with open('/tmp/big', 'wb') as f:\n        for _ in range(11):\n            f.write(b'x' * (1 << 20))\n", ResourceLimitError, LimitFileSize, "file size limit of 10 MiB"},
			{"filling /tmp", "def main():\n    for i in range(10):\n        open('/tmp/f%d' % i, 'wb').write(b'x' * (8 << 20))\n", ResourceLimitError, LimitDisk, "/sandbox and /tmp"},
			{"filling /sandbox", "def main():\n    for i in range(10):\n        open('/sandbox/f%d' % i, 'wb').write(b'x' * (8 << 20))\n", ResourceLimitError, LimitDisk, "/sandbox and /tmp"},
			{"100000 small files", "def main():\n    for i in range(100000):\n        open('/sandbox/%d' % i, 'w').close()\n", ResourceLimitError, LimitDisk, ""},
			{"file descriptors", "def main():\n    fs = [open('/dev/null') for _ in range(100000)]\n", ExecutionError, "", "Too many open files"},
			{"symlinks to host paths", "import os\ndef main():\n    out = []\n    for i, target in enumerate(['/etc/shadow', '/root', '/proc/1/root/etc/passwd', '../../../../etc/passwd']):\n        os.symlink(target, '/sandbox/l%d' % i)\n        try:\n            out.append(open('/sandbox/l%d' % i).read())\n        except OSError as e:\n            out.append(type(e).__name__)\n    return out\n", "", "", `["FileNotFoundError", "FileNotFoundError", "FileNotFoundError", "FileNotFoundError"]`},

			// Privilege and escape
			{"kill everything", "import os, subprocess\ndef main():\n    child = subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(60)'])\n    os.kill(-1, 9)\n    return ['survived', child.wait()]\n", "", "", `["survived", -9]`},
			{"ptrace, mount, unshare, bpf, kexec: refused by seccomp", `import ctypes
def main():
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for name, nr, args in (("ptrace", 101, (16, 1, 0, 0)), ("mount", 165, (b"none", b"/tmp", b"tmpfs", 0, 0)),
                           ("unshare_user", 272, (0x10000000,)), ("unshare_net", 272, (0x40000000,)),
                           ("setns", 308, (0, 0)), ("bpf", 321, (0, 0, 0)), ("kexec_load", 246, (0, 0, 0, 0)),
                           ("userfaultfd", 323, (0,)), ("io_uring_setup", 425, (1, 0)), ("perf_event_open", 298, (0, 0, -1, -1, 0)),
                           ("clone_newuser", 56, (0x10000000 | 17, 0, 0, 0, 0))):
        r = libc.syscall(nr, *args)
        out[name] = "allowed" if r >= 0 else ctypes.get_errno()
    return out
`, "", "", `{"ptrace": 1, "mount": 1, "unshare_user": 1, "unshare_net": 1, "setns": 1, "bpf": 1, "kexec_load": 1, "userfaultfd": 1, "io_uring_setup": 1, "perf_event_open": 1, "clone_newuser": 1}`},
			{"setuid(0)", "import os\ndef main():\n    os.setuid(0)\n", ExecutionError, "", "OSError: [Errno 22]"}, // uid 0 does not exist in the jail
			{"chroot", "import os\ndef main():\n    os.chroot('/tmp')\n", ExecutionError, "", "PermissionError"},
			{"writing /etc/hosts", "def main():\n    open('/etc/hosts', 'w').write('1.2.3.4 x')\n", ExecutionError, "", "FileNotFoundError"},
			{"reading init's environment", "def main():\n    return sorted(k.split(b'=')[0].decode() for k in open('/proc/1/environ', 'rb').read().split(b'\\0') if k)\n", "", "", `["HOME", "LANG", "LD_LIBRARY_PATH", "MKL_NUM_THREADS", "MPLBACKEND", "MPLCONFIGDIR", "NUMEXPR_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH"]`},
			{"segfault", "import ctypes\ndef main():\n    ctypes.string_at(0)\n", ExecutionError, "", "signal 11"},
			{"sys.exit at import", "import sys\nsys.exit(5)\n", ExecutionError, "", "exited with status 5"},
			{"os._exit in main", "import os\ndef main():\n    os._exit(0)\n", ExecutionError, "", "exited with status 0"},
			{"SIGTERM to itself", "import os, signal\ndef main():\n    os.kill(os.getpid(), signal.SIGTERM)\n", ExecutionError, "", "signal 15"},
			{"a signal it handles", "import os, signal\ndef main():\n    got = []\n    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))\n    os.kill(os.getpid(), signal.SIGUSR1)\n    return got\n", "", "", "[1]"},
			{"signals to init", "import os, signal\ndef main():\n    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL, signal.SIGSTOP):\n        os.kill(1, s)\n    return 'init lives'\n", "", "", `"init lives"`},
			{"KeyboardInterrupt", "def main():\n    raise KeyboardInterrupt\n", ExecutionError, "", "signal 2"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				if tt.kind == "" {
					got, _ := mustRun(t, tt.script)
					if got != tt.want {
						t.Fatalf("got %s, want %s", got, tt.want)
					}
				} else {
					se, _ := mustFail(t, tt.script, tt.kind, tt.limit)
					if !strings.Contains(se.Message, tt.want) {
						t.Fatalf("message %q lacks %q", se.Message, tt.want)
					}
				}
				if got, _ := mustRun(t, "def main():\n    return 'still serving'\n"); got != `"still serving"` {
					t.Fatalf("after the attack: %s", got)
				}
			})
		}
	})
}

// A fork bomb in one jail does not stop a script in another.
func TestForkBombDoesNotReachOtherJails(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			runner.Run(ctx, []byte("import os, time\ndef main():\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            time.sleep(0.01)\n"))
		}()
		for i := 0; i < 5; i++ {
			got, _ := mustRun(t, "import subprocess\ndef main():\n    return [subprocess.run(['/usr/local/bin/python3', '-c', 'print(1)'], capture_output=True).stdout.decode() for _ in range(10)]\n")
			if got != `["1\n", "1\n", "1\n", "1\n", "1\n", "1\n", "1\n", "1\n", "1\n", "1\n"]` {
				t.Fatalf("next to a fork bomb: %s", got)
			}
		}
		wg.Wait()
	})
}

// A script that ran into the process or memory limit and did not finish gets that limit's error, also when its
// time runs out after, and also while every CPU of the machine is busy with other work (CI once answered a fork
// bomb TimeoutError on a loaded machine). The CPUs are saturated by processes this test starts.
func TestLimitsDoNotDependOnLoad(t *testing.T) {
	for i := 0; i < 2*runtime.NumCPU(); i++ {
		burner := exec.Command("/bin/sh", "-c", "while :; do :; done")
		if err := burner.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { burner.Process.Kill(); burner.Wait() })
	}
	onBothPaths(t, func(t *testing.T) {
		for _, tt := range []struct {
			name, script string
			limit        Limit
		}{
			{"fork bomb", "import os\ndef main():\n    while True:\n        os.fork()\n", LimitProcesses},
			{"memory hog", "def main():\n    xs = []\n    while True:\n        xs.append(bytearray(1 << 20))\n", LimitMemory},
			// These hit the limit, then wait for the clock: without the rule they would be TimeoutErrors.
			{"forks to the limit, then waits", "import os, time\ndef main():\n    while True:\n        try:\n            if os.fork() == 0:\n                time.sleep(60)\n        except OSError:\n            time.sleep(60)\n", LimitProcesses},
			{"a child is OOM-killed, then it waits", "import multiprocessing, time\ndef hog():\n    xs = []\n    while True:\n        xs.append(bytearray(1 << 20))\ndef main():\n    multiprocessing.Process(target=hog).start()\n    time.sleep(60)\n", LimitMemory},
		} {
			t.Run(tt.name, func(t *testing.T) {
				mustFail(t, tt.script, ResourceLimitError, tt.limit)
			})
		}
	})
}
