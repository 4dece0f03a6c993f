package sandbox

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"testing"
	"unicode/utf8"
)

// frameOf builds what the harness writes: the start byte, then kind, length and payload.
func frameOf(kind byte, payload string) []byte {
	b := []byte{'S', kind, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint64(b[2:], uint64(len(payload)))
	return append(b, payload...)
}

// FuzzResultChannel: whatever arrives on the result channel and however the jail ended, the decision is one of
// the contract's outcomes, a result only ever comes from a complete, well-formed frame, and nothing panics.
func FuzzResultChannel(f *testing.F) {
	for _, seed := range [][]byte{frameOf('R', `{"ok": true}`), frameOf('R', "1180591620717411303425"),
		frameOf('E', `{"kind":"exception","type":"ValueError","message":"x"}`), frameOf('E', `{"kind":"serialization"}`),
		frameOf('E', `{"kind":"exception","errno":27}`), frameOf('E', `{"kind":"missing_main"}`), frameOf('R', ""),
		frameOf('R', "garbage"), frameOf('X', "1"), frameOf('R', "[[[[[[[["), frameOf('R', "\"\xff\""),
		append(frameOf('R', "null"), frameOf('R', "1")...), frameOf('R', "1")[:5], []byte("S"), []byte(""), []byte("X"),
		append(frameOf('F', `{"files":[{"path":"a.txt","size":2,"content":"aGk="}]}`), frameOf('R', "1")[1:]...),
		append(frameOf('F', `{"files":[{"path":"../x","size":0,"content":""}]}`), frameOf('R', "1")[1:]...),
		append(frameOf('F', `{"files":[],"omitted":[{"path":"b","size":9437184}],"truncated":true}`), frameOf('R', "1")[1:]...),
		append(frameOf('F', `{"files":[{"path":".h","size":0,"content":""}]}`), frameOf('E', `{"kind":"exception"}`)[1:]...)} {
		f.Add(seed, 0, uint8(0))
		f.Add(seed, 137, uint8(0b0100))
	}
	limits := Limits{Wall: 3e9, MemoryBytes: 256 << 20, Processes: 64, CPUSeconds: 3, FileSizeMiB: 10, TmpfsBytes: 32 << 20}
	const maxResult = 64
	f.Fuzz(func(t *testing.T, data []byte, exit int, flags uint8) {
		res := readResult(bytes.NewReader(data), make(chan struct{}), maxResult+16)
		o := observation{started: res.started, truncated: res.truncated, exitCode: exit,
			timedOut: flags&1 != 0, pidsMax: flags&2 != 0, oomKilled: flags&4 != 0, rlimits: flags&8 != 0,
			files: res.files}
		if res.complete {
			o.frame = res.frame
		}
		result, files, err := classify(o, limits, maxResult)
		var total int64
		for _, f := range files.Files {
			if CheckPath(f.Path) != nil || hidden(f.Path) || f.Size < 0 {
				t.Fatalf("file %+v from %q", f, data)
			}
			total += f.Size
		}
		for _, f := range files.Omitted {
			if CheckPath(f.Path) != nil || hidden(f.Path) || f.Size < 0 || !files.Truncated {
				t.Fatalf("omitted file %+v from %q", f, data)
			}
		}
		if len(files.Files) > MaxFiles || len(files.Omitted) > MaxFiles || total > MaxOutputBytes {
			t.Fatalf("%d files of %d bytes, %d omitted, from %q", len(files.Files), total, len(files.Omitted), data)
		}
		var se *ScriptError
		switch {
		case !res.started:
			if !errors.Is(err, ErrSandbox) || result != nil {
				t.Fatalf("a jail that never started gave %s, %v", result, err)
			}
		case err == nil:
			if o.timedOut || !res.complete || len(res.frame) < 1 || res.frame[0] != 'R' || !json.Valid(result) ||
				len(result) > maxResult || !bytes.Equal(result, bytes.TrimSpace(res.frame[1:])) {
				t.Fatalf("result %q from %q", result, data)
			}
		case errors.As(err, &se):
			switch se.Kind {
			case ExecutionError, SerializationError, TimeoutError, ResourceLimitError:
			default:
				t.Fatalf("kind %q", se.Kind)
			}
			if se.Message == "" && se.Kind != ExecutionError {
				t.Fatalf("no message: %+v", se)
			}
			// When the deadline fired, the answer is the clock's, unless the script ran into the memory or process
			// limit on the way: then it is that limit's (an answer must not depend on how fast the machine was).
			onTheWay := o.oomKilled && se.Limit == LimitMemory || o.pidsMax && se.Limit == LimitProcesses
			if o.timedOut && se.Kind != TimeoutError && !(se.Kind == ResourceLimitError && onTheWay) {
				t.Fatalf("the deadline fired but the outcome is %s/%s", se.Kind, se.Limit)
			}
		case errors.Is(err, ErrSandbox) && exit < 0 && !o.timedOut && !o.oomKilled && len(o.frame) == 0:
			// A jail whose end left no exit status (a forked jail whose fork server died): the sandbox's failure.
		default:
			t.Fatalf("a started jail gave %v", err)
		}
	})
}

// FuzzStdout: stdout is read to its end, cut at its cap, flagged when cut, and always valid UTF-8.
func FuzzStdout(f *testing.F) {
	for _, seed := range []string{"hello\n", "\xff\xfe", "é", "\xe2\x82", strings64} {
		f.Add([]byte(seed))
	}
	const max = 16
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		c := capture{max: max}
		c.drain(r)
		if r.Len() != 0 {
			t.Fatal("not drained to the end")
		}
		if len(c.data) > max || c.truncated != (len(data) > max) || !bytes.HasPrefix(data, c.data) {
			t.Fatalf("kept %q (truncated %v) of %q", c.data, c.truncated, data)
		}
		if text := stdoutText(c.data); !utf8.ValidString(text) {
			t.Fatalf("invalid UTF-8 %q", text)
		}
	})
}

const strings64 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
