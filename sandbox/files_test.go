package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func runFiles(t *testing.T, script string, files ...File) (Outcome, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := runner.Run(ctx, []byte(script), files...)
	var se *ScriptError
	if err != nil && !errors.As(err, &se) {
		t.Fatalf("the sandbox itself failed: %v\nstderr: %s", err, out.Stderr)
	}
	return out, err
}

func decoded(t *testing.T, f OutputFile) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(f.Content)
	if err != nil || int64(len(b)) != f.Size {
		t.Fatalf("file %s: size %d, content %q", f.Path, f.Size, f.Content)
	}
	return b
}

func paths(files []OutputFile) string {
	var p []string
	for _, f := range files {
		p = append(p, f.Path)
	}
	return strings.Join(p, " ")
}

// Input files arrive under /sandbox byte for byte (all 256 byte values, nested directories); what the script
// writes comes back, sorted by path, with the inputs it left unchanged left out and the one it changed in.
func TestFilesRoundTrip(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		var all []byte
		for i := 0; i < 256; i++ {
			all = append(all, byte(i))
		}
		out, err := runFiles(t, `import hashlib, os
def main():
    data = open("in/bytes.bin", "rb").read()
    os.makedirs("out/deep/er", exist_ok=True)
    open("out/deep/er/copy.bin", "wb").write(data[::-1])
    open("notes.txt", "a").write("more")
    open("b.txt", "w").write("b")
    return [len(data), hashlib.sha256(data).hexdigest(), sorted(os.listdir("in"))]
`, File{"in/bytes.bin", all}, File{"in/same.txt", []byte("unchanged")}, File{"notes.txt", []byte("x")})
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf(`[256, "%x", ["bytes.bin", "same.txt"]]`, sha256sum(all)); string(out.Result) != want {
			t.Fatalf("result %s, want %s", out.Result, want)
		}
		if got := paths(out.Files); got != "b.txt notes.txt out/deep/er/copy.bin" {
			t.Fatalf("files %s", got)
		}
		if b := decoded(t, out.Files[2]); len(b) != 256 || b[0] != 255 || b[255] != 0 {
			t.Fatalf("copy.bin: %v", b)
		}
		if b := decoded(t, out.Files[1]); string(b) != "xmore" {
			t.Fatalf("notes.txt %q", b)
		}
	})
}

// Files are returned on error too, as they stood when main() raised.
func TestFilesOfAScriptThatRaised(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		out, err := runFiles(t, "def main():\n    open('partial.csv', 'w').write('a,b\\n')\n    raise ValueError('half way')\n")
		var se *ScriptError
		if !errors.As(err, &se) || se.Kind != ExecutionError || paths(out.Files) != "partial.csv" {
			t.Fatalf("%v, files %s", err, paths(out.Files))
		}
	})
}

// Nothing that is not a regular file under /sandbox comes back, and nothing makes the collection hang: a symlink
// to a file outside (and one to a file inside), a FIFO, a socket, hidden files and directories.
func TestFilesNeverFollowedOrOpened(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		out, err := runFiles(t, `import os, socket
def main():
    open("/tmp/outside.txt", "w").write("outside")
    open("real.txt", "w").write("real")
    os.symlink("/tmp/outside.txt", "link-out.txt")
    os.symlink("real.txt", "link-in.txt")
    os.symlink("/proc/self/environ", "env")
    os.mkfifo("fifo")
    s = socket.socket(socket.AF_UNIX); s.bind("sock")
    open(".hidden", "w").write("h")
    os.makedirs(".dir"); open(".dir/x", "w").write("x")
    os.makedirs("d/.e"); open("d/.e/y", "w").write("y"); open("d/z", "w").write("z")
    return "ok"
`)
		if err != nil {
			t.Fatal(err)
		}
		if got := paths(out.Files); got != "d/z real.txt" {
			t.Fatalf("files %s", got)
		}
	})
}

// omittedText lists omitted files as "path:size" for comparison.
func omittedText(files []OmittedFile) string {
	var p []string
	for _, f := range files {
		p = append(p, fmt.Sprintf("%s:%d", f.Path, f.Size))
	}
	return strings.Join(p, " ")
}

// numbered is "prefix00 prefix01 ..." from lo to hi-1, as the scripts below name their files.
func numbered(prefix string, width, lo, hi int) string {
	var p []string
	for i := lo; i < hi; i++ {
		p = append(p, fmt.Sprintf("%s%0*d", prefix, width, i))
	}
	return strings.Join(p, " ")
}

// At most 64 files and 8 MiB come back, the smallest (ties by path), none cut short; what does not fit is left
// out and named with its size, never an error: a script may use /sandbox as scratch space, and its answer stands.
func TestFilesThatDoNotFitAreLeftOut(t *testing.T) {
	var seventy, twoHundred []string
	for i := 64; i < 70; i++ {
		seventy = append(seventy, fmt.Sprintf("f%02d:1", i))
	}
	for i := 64; i < 128; i++ {
		twoHundred = append(twoHundred, fmt.Sprintf("f%03d:1", i))
	}
	onBothPaths(t, func(t *testing.T) {
		for _, tt := range []struct {
			name, script string
			result, kept string
			omitted      string
			truncated    bool
		}{
			{"64 files", "def main():\n    for i in range(64):\n        open('f%02d' % i, 'w').write('x')\n    return 1\n",
				"1", numbered("f", 2, 0, 64), "", false},
			{"70 small files", "def main():\n    for i in range(70):\n        open('f%02d' % i, 'w').write('x')\n    return 1\n",
				"1", numbered("f", 2, 0, 64), strings.Join(seventy, " "), true},
			{"200 small files: 64 named", "def main():\n    for i in range(200):\n        open('f%03d' % i, 'w').write('x')\n    return 1\n",
				"1", numbered("f", 3, 0, 64), strings.Join(twoHundred, " "), true},
			{"8 MiB", "def main():\n    open('a', 'wb').write(b'x' * (4 << 20)); open('b', 'wb').write(b'y' * (4 << 20))\n    return 1\n",
				"1", "a b", "", false},
			{"8 MiB and a byte", "def main():\n    open('a', 'wb').write(b'x' * (4 << 20)); open('b', 'wb').write(b'y' * ((4 << 20) + 1))\n    return 1\n",
				"1", "a", "b:4194305", true},
			{"a 9 MiB scratch file", "def main():\n    open('scratch.csv', 'wb').write(b'1,2\\n' * (9 << 18))\n    open('summary.txt', 'w').write('ok')\n    return 'done'\n",
				`"done"`, "summary.txt", "scratch.csv:9437184", true},
			{"the smallest are kept", "def main():\n    for name, size in (('big', 5 << 20), ('mid', 3 << 20), ('small', 1 << 20), ('tiny', 10)):\n        open(name, 'wb').write(b'z' * size)\n    return 1\n",
				"1", "mid small tiny", "big:5242880", true},
			{"ties by path", "def main():\n    for name in ('c', 'a', 'b'):\n        open(name, 'wb').write(b'z' * (3 << 20))\n    return 1\n",
				"1", "a b", "c:3145728", true},
			// The file-size limit (10 MiB) refuses a 1 GiB sparse file; the largest sparse file it allows is left out
			// by its size alone: its content is never read.
			{"a sparse file", "import os\ndef main():\n    f = open('sparse', 'w')\n    try:\n        os.truncate(f.fileno(), 1 << 30)\n        got = '1 GiB'\n    except OSError as e:\n        os.truncate(f.fileno(), 10 << 20)\n        got = e.errno\n    open('small', 'w').write('s')\n    return got\n",
				"27", "small", "sparse:10485760", true},
			// snekbox's case: deeper than an answer's paths may go. The walk cuts the subtree and says so.
			{"a deep tree", "import os\ndef main():\n    x = ''\n    for _ in range(1000):\n        x += 'a/'\n        os.mkdir(x)\n    open(x + 'test.txt', 'w').write('test')\n    open('top.txt', 'w').write('top')\n    return 1\n",
				"1", "top.txt", "", true},
		} {
			t.Run(tt.name, func(t *testing.T) {
				out, err := runFiles(t, tt.script)
				if err != nil {
					t.Fatalf("%v\nstderr: %s", err, out.Stderr)
				}
				if string(out.Result) != tt.result || paths(out.Files) != tt.kept || omittedText(out.FilesOmitted) != tt.omitted ||
					out.FilesTruncated != tt.truncated {
					t.Fatalf("result %s, files %q, omitted %q, truncated %v", out.Result, paths(out.Files),
						omittedText(out.FilesOmitted), out.FilesTruncated)
				}
				for _, f := range out.Files {
					decoded(t, f) // every file whole: its content is exactly its size
				}
			})
		}
	})
}

// The walk of /sandbox is bounded in CPU time: a tree that takes longer is cut and flagged, not walked to its end.
// The harness's own collection runs here in a jail, with no time at all to walk.
func TestFilesWalkIsBounded(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		got, _ := mustRun(t, `import importlib.util
def main():
    spec = importlib.util.spec_from_file_location("h", "/safepy/harness.py")
    h = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(h)
    open("a", "w").write("a")
    files, omitted, truncated = h.collect_outputs({}, 64, 8 << 20, 1024, 0)
    full = h.collect_outputs({}, 64, 8 << 20, 1024, 10)
    return [len(files), truncated, len(full[0]), full[2]]
`)
		if got != "[0, true, 1, false]" {
			t.Fatalf("got %s", got)
		}
	})
}

// stderr is captured in order, capped like stdout and flagged when cut; it is empty when the script wrote none.
func TestStderr(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		out, err := runFiles(t, `import os, sys, subprocess
def main():
    print("one", file=sys.stderr)
    os.write(2, b"two\n")
    sys.stderr.write("three\n"); sys.stderr.flush()
    subprocess.run(["/usr/local/bin/python3", "-c", "import sys; sys.stderr.write('four\\n')"])
    print("out")
    return 1
`)
		if err != nil || out.Stderr != "one\ntwo\nthree\nfour\n" || out.Stdout != "out\n" || out.StderrTruncated {
			t.Fatalf("%v stderr %q stdout %q", err, out.Stderr, out.Stdout)
		}
		out, err = runFiles(t, "import os\ndef main():\n    for _ in range(3 * 1024):\n        os.write(2, b'e' * 1024)\n    return 1\n")
		if err != nil || !out.StderrTruncated || len(out.Stderr) != 1<<20 || strings.Trim(out.Stderr, "e") != "" {
			t.Fatalf("%v truncated %v len %d", err, out.StderrTruncated, len(out.Stderr))
		}
		out, _ = runFiles(t, "def main():\n    return 1\n")
		if out.Stderr != "" || len(out.Files) != 0 {
			t.Fatalf("a quiet script: stderr %q files %v", out.Stderr, out.Files)
		}
	})
}

// A forged files frame only spoils the forger's own answer.
func TestForgedFilesFrame(t *testing.T) {
	many := make([]map[string]any, 65)
	for i := range many {
		many[i] = map[string]any{"path": fmt.Sprintf("f%02d", i), "size": 1}
	}
	manyJS, _ := json.Marshal(many)
	onBothPaths(t, func(t *testing.T) {
		for _, payload := range []string{
			`{"files": [{"path": "../../etc/passwd", "size": 1, "content": "eA=="}]}`,
			`{"files": [], "omitted": [{"path": "x", "size": 1}], "truncated": false}`,
			`{"files": [{"path": "x", "size": 1, "content": "eA=="}], "omitted": [{"path": "x", "size": 1}], "truncated": true}`,
			`{"files": [], "omitted": [{"path": "/etc/shadow", "size": 1}], "truncated": true}`,
			`{"files": [], "omitted": ` + string(manyJS) + `, "truncated": true}`,
			`[{"path": "x", "size": 1, "content": "eA=="}]`,
		} {
			_, err := runFiles(t, fmt.Sprintf(`import os
def main():
    payload = %q.encode()
    os.write(4, b"F" + len(payload).to_bytes(8, "big") + payload)
    return 1
`, payload))
			var se *ScriptError
			if !errors.As(err, &se) || se.Kind != ExecutionError || !strings.Contains(se.Message, "result channel") {
				t.Fatalf("%s: got %v", payload, err)
			}
		}
	})
}

func sha256sum(b []byte) []byte {
	sum := sha256.Sum256(b)
	return sum[:]
}

// The server's own checks of what a request may send, and of what a jail sends back.
func TestCheckFiles(t *testing.T) {
	for _, tt := range []struct {
		files []File
		bad   int // -1: fine
		want  string
	}{
		{[]File{{"a.csv", nil}, {"d/e/f.txt", nil}}, -1, ""},
		{[]File{{"", nil}}, 0, "empty"},
		{[]File{{"/etc/passwd", nil}}, 0, "not absolute"},
		{[]File{{"a", nil}, {"b/../c", nil}}, 1, `".." component`},
		{[]File{{"./a", nil}}, 0, `"." component`},
		{[]File{{"a//b", nil}}, 0, "empty component"},
		{[]File{{"a\x00b", nil}}, 0, "NUL"},
		{[]File{{"x", nil}, {"y", nil}, {"x", nil}}, 2, "same as that of entry 0"},
		{[]File{{"d", nil}, {"d/e", nil}}, 1, "below entry 0's"},
		{[]File{{strings.Repeat("a", 256), nil}}, 0, "longer than 255"},
	} {
		i, err := CheckFiles(tt.files, 4096)
		if tt.bad < 0 {
			if err != nil {
				t.Errorf("%v: %v", tt.files, err)
			}
			continue
		}
		if err == nil || i != tt.bad || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: entry %d, %v; want entry %d, %q", tt.files, i, err, tt.bad, tt.want)
		}
	}
	many := make([]File, MaxFiles+1)
	for i := range many {
		many[i].Path = fmt.Sprint(i)
	}
	if _, err := CheckFiles(many, 4096); err == nil {
		t.Error("65 files passed")
	}
	if i, err := CheckFiles([]File{{"a/b/c", nil}, {"a/b/d", nil}, {"e/f", nil}}, 6); err == nil || i != 2 {
		t.Errorf("7 inodes in 6: entry %d, %v", i, err)
	}
}

// A plot saved with matplotlib comes back as a PNG, with nothing on stderr: Agg is the backend, and the font cache
// the runtime was installed with is there (no jail builds it).
func TestPlot(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		out, err := runFiles(t, `import pandas as pd
import matplotlib.pyplot as plt
def main():
    df = pd.read_csv("data.csv")
    fig, ax = plt.subplots()
    df.plot(x="day", y="visits", ax=ax)
    fig.savefig("plots/visits.png")
    return plt.get_backend()
`, File{"data.csv", []byte("day,visits\n1,3\n2,5\n3,4\n")}, File{"plots/.keep", nil})
		if err != nil {
			t.Fatalf("%v\nstderr: %s", err, out.Stderr)
		}
		if !strings.EqualFold(string(out.Result), `"agg"`) || out.Stderr != "" {
			t.Fatalf("backend %s, stderr %q", out.Result, out.Stderr)
		}
		if len(out.Files) != 1 || out.Files[0].Path != "plots/visits.png" {
			t.Fatalf("files %s", paths(out.Files))
		}
		png := decoded(t, out.Files[0])
		if !strings.HasPrefix(string(png), "\x89PNG\r\n\x1a\n") || len(png) < 1000 {
			t.Fatalf("not a PNG: %q", png[:min(len(png), 16)])
		}
	})
}

// A tree deeper than an answer's paths may go is cut and flagged, not a crash or an error; and a directory
// swapped for a symlink while the harness collects never leads it out of /sandbox.
func TestFilesDeepAndSwapped(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		out, err := runFiles(t, "import os\ndef main():\n    os.makedirs('/'.join(['d'] * 600))\n    open('/'.join(['d'] * 600) + '/f', 'w').write('x')\n    return 1\n")
		if err != nil || len(out.Files) != 0 || !out.FilesTruncated {
			t.Fatalf("a tree 600 deep: %v, %d files, truncated %v", err, len(out.Files), out.FilesTruncated)
		}
		for i := 0; i < 5; i++ {
			out, err := runFiles(t, `import os, subprocess, time
def main():
    os.makedirs("d"); open("d/in.txt", "w").write("in")
    subprocess.Popen(["/usr/local/bin/python3", "-c", """
import os
while True:
    try:
        os.rename("d", "d.real"); os.symlink("/usr/local/lib", "d")
        os.unlink("d"); os.rename("d.real", "d")
    except OSError:
        pass
"""])
    time.sleep(0.05)
    return 1
`)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range out.Files {
				if f.Path != "d/in.txt" && f.Path != "d.real/in.txt" { // its two names as the swapper renames it
					t.Fatalf("collected %s: the walk left /sandbox", f.Path)
				}
			}
		}
	})
}

// Files within the caps come back whatever their names: 64 files of 8 MiB in all, under paths of control
// characters near the path limit (JSON writes each such byte as six).
func TestFilesWithEscapedNames(t *testing.T) {
	onBothPaths(t, func(t *testing.T) {
		out, err := runFiles(t, `import os
def main():
    d = "/".join(["\x01" * 250] * 4)
    os.makedirs(d)
    for i in range(64):
        open("%s/f%02d" % (d, i), "wb").write(b"x" * (128 << 10))
    return 1
`)
		if err != nil || len(out.Files) != 64 {
			t.Fatalf("%v, %d files", err, len(out.Files))
		}
	})
}

// The files frame's contents are checked a piece at a time, with the verdict and size of a whole decode.
func TestBase64Size(t *testing.T) {
	for _, n := range []int{0, 1, 2, 3, 4, 49151, 49152, 49153, 100000, 1 << 20} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i * 7)
		}
		s := base64.StdEncoding.EncodeToString(b)
		if got, ok := base64Size(s); !ok || got != int64(n) {
			t.Errorf("%d bytes: %d, %v", n, got, ok)
		}
		if n > 70000 { // padding in the middle, at and off a piece's end
			for _, at := range []int{65536 - 2, 70000} {
				if _, ok := base64Size(s[:at] + "==" + s[at+2:]); ok {
					t.Errorf("%d bytes with padding at %d: accepted", n, at)
				}
			}
		}
	}
	for _, s := range []string{"a", "a===", "YR==x", "====", "!!!!", "YQ=\n"} {
		if _, ok := base64Size(s); ok {
			t.Errorf("%q accepted", s)
		}
	}
}
