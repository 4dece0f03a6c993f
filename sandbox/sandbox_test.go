package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/safe-py/safepy/internal/proctree"
)

// The result arrives byte for byte as Python's json.dumps wrote it: no float64 round trip anywhere.
func TestResultFidelity(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		tests := []struct {
			name, expr, want string
		}{
			{"big int", "2**70 + 1", "1180591620717411303425"},
			{"huge int", "-(10**60)", "-1000000000000000000000000000000000000000000000000000000000000"},
			{"int beyond Python's str() digit limit", "10**5000", "1" + strings.Repeat("0", 5000)},
			{"decimal fraction", "0.1", "0.1"},
			{"float extremes", "[1.7976931348623157e308, 5e-324, -0.0, 1e16]", "[1.7976931348623157e+308, 5e-324, -0.0, 1e+16]"},
			{"None", "None", "null"},
			{"bools", "[True, False]", "[true, false]"},
			{"tuple", "(1, (2, 3))", "[1, [2, 3]]"},
			{"int keys", "{1: 'a'}", `{"1": "a"}`},
			{"unicode", "'héllo ☃ \\U0001F600'", `"héllo ☃ 😀"`},
			{"lone surrogate", "'\\ud800'", `"\ud800"`},
			{"control characters", "'a\\x00\\n\"'", `"a\u0000\n\""`},
			{"empty dict", "{}", "{}"},
			{"string that looks like a frame", "'R{}'", `"R{}"`},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				got, _ := mustRun(t, "def main():\n    return "+tt.expr+"\n")
				if got != tt.want {
					t.Fatalf("result %s, want %s", got, tt.want)
				}
			})
		}
	})
}

func TestStdout(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		tests := []struct {
			name, body, want string
		}{
			{"print and os.write keep their order",
				"print('a'); os.write(1, b'b\\n'); print('c'); sys.stdout.write('d'); os.write(1, b'e')", "a\nb\nc\nde"},
			{"no trailing newline", "sys.stdout.write('no newline')", "no newline"},
			{"invalid UTF-8 is replaced", "os.write(1, b'ok\\xff\\xfe!')", "ok\uFFFD!"},
			{"C stdio", "import ctypes; ctypes.CDLL(None).printf(b'from C\\n')", "from C\n"},
			{"child processes", "import subprocess; subprocess.run(['/usr/local/bin/python3', '-c', 'print(\"child\")'])", "child\n"},
			{"stderr is not stdout", "print('err', file=sys.stderr); os.write(2, b'x')", ""},
			{"fake frames in stdout change nothing",
				"print('R{\"forged\": 1}'); print('S'); os.write(1, b'E{\"kind\": \"exception\"}')",
				"R{\"forged\": 1}\nS\nE{\"kind\": \"exception\"}"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				got, out := mustRun(t, "import os, sys\ndef main():\n    "+tt.body+"\n    return 'done'\n")
				if out.Stdout != tt.want || got != `"done"` {
					t.Fatalf("stdout %q result %s, want %q and \"done\"", out.Stdout, got, tt.want)
				}
			})
		}
	})
}

func TestStdoutCap(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		// 3 MiB against the 1 MiB cap: cut at the cap, flagged, and the script is not blocked on a full pipe.
		got, out := mustRun(t, "import os\ndef main():\n    for _ in range(3 * 1024):\n        os.write(1, b'x' * 1024)\n    return 1\n")
		if got != "1" || !out.StdoutTruncated || len(out.Stdout) != 1<<20 || strings.Trim(out.Stdout, "x") != "" {
			t.Fatalf("result %s truncated %v len %d", got, out.StdoutTruncated, len(out.Stdout))
		}
	})
}

// Each failure the contract names, decided from what the Go side observed.
func TestScriptErrors(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		tests := []struct {
			name, script string
			kind         Kind
			limit        Limit
			message      string // a prefix or part of the message
		}{
			{"syntax error", "def main(:\n", ExecutionError, "", "SyntaxError"},
			{"exception at import", "raise ValueError('at import')\n", ExecutionError, "", "ValueError: at import"},
			{"exception in main", "def main():\n    return 1 / 0\n", ExecutionError, "", "ZeroDivisionError: division by zero"},
			{"main missing", "x = 1\n", ExecutionError, "", "main() is missing or not callable"},
			{"main not callable", "main = 5\n", ExecutionError, "", "main() is missing or not callable"},
			{"sys.exit in main", "import sys\ndef main():\n    sys.exit(3)\n", ExecutionError, "", "exited with status 3"},
			{"os._exit at import", "import os\nos._exit(0)\n", ExecutionError, "", "exited with status 0"},
			{"signal", "import os, signal\ndef main():\n    os.kill(os.getpid(), signal.SIGKILL)\n", ExecutionError, "", "signal 9"},
			{"segfault", "import ctypes\ndef main():\n    ctypes.string_at(0)\n", ExecutionError, "", "signal 11"},
			{"set", "def main():\n    return {1, 2}\n", SerializationError, "", "main() must return JSON-serializable data"},
			{"object", "def main():\n    return object()\n", SerializationError, "", "main() must return JSON-serializable data"},
			{"NaN", "def main():\n    return float('nan')\n", SerializationError, "", "main() must return JSON-serializable data"},
			{"Infinity", "def main():\n    return [float('inf')]\n", SerializationError, "", "main() must return JSON-serializable data"},
			{"DataFrame", "import pandas as pd\ndef main():\n    return pd.DataFrame({'a': [1]})\n", SerializationError, "", "main() must return JSON-serializable data"},
			{"wall time", "def main():\n    while True:\n        pass\n", TimeoutError, LimitWall, fmt.Sprintf("wall-clock limit of %s", runner.limits.Wall)},
			{"memory", "def main():\n    x = bytearray(300 << 20)\n    for i in range(0, len(x), 4096):\n        x[i] = 1\n", ResourceLimitError, LimitMemory, "memory limit of 256 MiB"},
			{"file size", "def main():\n    open('/sandbox/big', 'wb').write(b'x' * (11 << 20))\n", ResourceLimitError, LimitFileSize, "file size limit of 10 MiB"},
			{"processes", "import subprocess\ndef main():\n    ps = [subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(30)']) for _ in range(100)]\n", ResourceLimitError, LimitProcesses, "process limit of 64"},
			{"result size", "def main():\n    return 'x' * (2 << 20)\n", ResourceLimitError, LimitResult, "result is larger than the limit"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				se, _ := mustFail(t, tt.script, tt.kind, tt.limit)
				if !strings.Contains(se.Message, tt.message) {
					t.Fatalf("message %q does not contain %q", se.Message, tt.message)
				}
			})
		}
	})
}

func TestTracebackNamesTheScript(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		se, out := mustFail(t, "def helper():\n    raise KeyError('k')\ndef main():\n    print('before')\n    helper()\n", ExecutionError, "")
		for _, want := range []string{`File "/sandbox/script.py", line 2, in helper`, "raise KeyError('k')", "KeyError: 'k'"} {
			if !strings.Contains(se.Traceback, want) {
				t.Errorf("traceback lacks %q:\n%s", want, se.Traceback)
			}
		}
		if strings.Contains(se.Traceback, "harness") {
			t.Errorf("traceback shows the harness:\n%s", se.Traceback)
		}
		if out.Stdout != "before\n" {
			t.Errorf("stdout %q, want the output printed before the exception", out.Stdout)
		}
	})
}

// What main() returns is the answer even when the script forks or writes to the result channel's number.
func TestResultChannelIsTheHarnesss(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, "import os\ndef main():\n    os.fork()\n    return 'once'\n")
		if got != `"once"` {
			t.Fatalf("a forked copy of the script changed the result: %s", got)
		}
	})
}

func TestWorkingModules(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		script := `import os, threading, multiprocessing
def square(x):
    return x * x
def main():
    import numpy as np, pandas as pd
    seen = []
    t = threading.Thread(target=lambda: seen.append(1)); t.start(); t.join()
    with multiprocessing.Pool(2) as pool:
        squares = pool.map(square, [1, 2, 3])
    open('/sandbox/a', 'w').write('x'); open('/tmp/b', 'w').write('y')
    return [int(np.arange(4).sum()), int(pd.DataFrame({'a': [1, 2]})['a'].sum()), seen, squares,
            open('/sandbox/a').read() + open('/tmp/b').read(), os.getcwd()]
`
		got, _ := mustRun(t, script)
		if want := `[6, 3, [1], [1, 4, 9], "xy", "/sandbox"]`; got != want {
			t.Fatalf("got %s, want %s", got, want)
		}
	})
}

// A script may use 200 MiB of its 256.
func TestTwoHundredMiB(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, "def main():\n    a = bytearray(200 << 20)\n    for i in range(0, len(a), 4096):\n        a[i] = 1\n    return len(a)\n")
		if got != "209715200" {
			t.Fatalf("got %s", got)
		}
	})
}

// A jail's init killed from the host (or by anything outside the jail: nothing inside can signal it) is the
// sandbox's failure, not the script's: its answer must not blame the script with "killed by signal 9".
func TestAnInitKilledFromOutsideIsTheSandboxs(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		token := fmt.Sprintf("init-killed-%d", time.Now().UnixNano())
		done := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_, err := runner.Run(ctx, []byte(fmt.Sprintf("import subprocess, time\ndef main():\n    subprocess.Popen(['/usr/local/bin/python3', '-c', 'import time; time.sleep(60)', %q])\n    time.sleep(60)\n", token)))
			done <- err
		}()
		var marker []proctree.Proc
		for deadline := time.Now().Add(20 * time.Second); len(marker) == 0; time.Sleep(5 * time.Millisecond) {
			if marker = proctree.Live(os.Getpid(), token); time.Now().After(deadline) {
				t.Fatal("the script did not start")
			}
		}
		// The marker's parent is the script's process; its parent, the jail's init.
		procs := map[int]proctree.Proc{}
		for _, p := range proctree.Descendants(os.Getpid()) {
			procs[p.PID] = p
		}
		init := procs[procs[marker[0].PPID].PPID]
		if init.PID == 0 || init.UID != marker[0].UID {
			t.Fatalf("not the jail's init: %+v (the marker: %+v)", init, marker[0])
		}
		syscall.Kill(init.PID, syscall.SIGKILL)
		if err := <-done; !errors.Is(err, ErrSandbox) || !strings.Contains(err.Error(), "killed from outside") {
			t.Fatalf("got %v, want the sandbox's failure", err)
		}
	})
}
