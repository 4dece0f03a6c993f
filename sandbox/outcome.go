package sandbox

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"
)

// Kind is the contract's error type for a script that did not return a result.
type Kind string

const (
	ExecutionError     Kind = "ExecutionError"
	SerializationError Kind = "SerializationError"
	TimeoutError       Kind = "TimeoutError"
	ResourceLimitError Kind = "ResourceLimitError"
)

// Limit names the limit a script ran into, for ResourceLimitError and TimeoutError.
type Limit string

const (
	LimitWall      Limit = "wall_time"
	LimitCPU       Limit = "cpu_time"
	LimitMemory    Limit = "memory"
	LimitFileSize  Limit = "file_size"
	LimitProcesses Limit = "processes"
	LimitResult    Limit = "result_size"
	LimitDisk      Limit = "disk"
)

// ScriptError is a script's failure: something the script did, never a fault of the sandbox.
type ScriptError struct {
	Kind      Kind
	Message   string
	Traceback string
	Limit     Limit
}

func (e *ScriptError) Error() string { return string(e.Kind) + ": " + e.Message }

// ErrSandbox wraps every failure of the sandbox itself (it could not start a jail, the runtime is missing...).
var ErrSandbox = errors.New("sandbox failure")

// Outcome is what one execution produced. It is filled whenever the script started, also when Run returns a
// *ScriptError, so the caller can return the script's output with its error.
type Outcome struct {
	Result          json.RawMessage // main()'s return value as JSON text, exactly as Python wrote it
	Stdout          string          // valid UTF-8: invalid bytes replaced with U+FFFD
	StdoutTruncated bool
	Stderr          string // what the script wrote to descriptor 2, like Stdout
	StderrTruncated bool
	Files           []OutputFile  // the files the script left under /sandbox, when main() returned or raised
	FilesOmitted    []OmittedFile // those that did not fit the caps (at most MaxFiles of them named)
	FilesTruncated  bool          // files were left out, or a tree was cut
	Started         bool          // the interpreter came up and the script was handed over
	Warm            bool          // the jail came from the pool of warm jails
	BaseMemory      int64         // what the jail held when the script arrived (a forked jail: with its fork server's share, less the room its limit makes for copies of it); it counts against the limit
	PeakMemory      int64         // the most the jail's cgroup held (a forked jail's cgroup holds only what it did not share)
	Forked          bool          // the jail was forked from a fork server
	Timing          Timing
}

// Timing breaks an execution down. Startup runs from starting nsjail to the interpreter being ready for the
// script (zero for a warm jail: it was ready before the request came); Run from handing the script over to the
// jail's answer. Wall and CPU time are counted from the start of Run.
type Timing struct {
	Startup time.Duration
	Run     time.Duration
}

// observation is everything the Go side saw of one jail, the only input to classify.
type observation struct {
	started    bool
	stalled    bool   // the jail did not come up within the start-up timeout and was killed
	frame      []byte // a complete frame from the result channel: the kind byte and the payload
	truncated  bool   // the frame's header declared a payload longer than its cap
	files      []byte // the files frame's payload, if there was one
	exitCode   int    // nsjail's exit code: the harness init's status, 128+signal when the script was signalled
	initKilled bool   // the jail's init itself ended by a signal, which nothing inside the jail can send it
	timedOut   bool   // the Go side's wall-clock deadline fired
	oomKilled  bool   // the cgroup saw the OOM killer
	pidsMax    bool   // the cgroup refused a fork at its process limit
	rlimits    bool   // limits were enforced by rlimits, so there are no cgroup events to read
}

// errorFrame is what the harness reports when the script did not return a serializable value.
type errorFrame struct {
	Kind      string `json:"kind"`
	Type      string `json:"type"`
	Message   string `json:"message"`
	Traceback string `json:"traceback"`
	Errno     int    `json:"errno"`
}

// classify decides the outcome from what was observed, and the files that go with it. Nothing the script printed
// takes part; the result channel is the harness's, and what the script can forge there only harms its own answer.
func classify(o observation, l Limits, maxResult int) (json.RawMessage, filesFrame, error) {
	result, err := classifyResult(o, l, maxResult)
	// Files go with an answer the harness finished (its result frame came whole, in time); a jail that ran out of
	// time or ended otherwise has none to give, whatever it sent before.
	if !o.started || o.stalled || o.timedOut || len(o.frame) == 0 || errors.Is(err, ErrSandbox) || o.files == nil {
		return result, filesFrame{}, err
	}
	files, ferr := readFilesFrame(o.files)
	if ferr != nil {
		return nil, filesFrame{}, &ScriptError{Kind: ExecutionError, Message: "the script wrote over the result channel"}
	}
	return result, files, err
}

func classifyResult(o observation, l Limits, maxResult int) (json.RawMessage, error) {
	if !o.started || o.stalled {
		return nil, fmt.Errorf("%w: the jail did not start (exit status %d)", ErrSandbox, o.exitCode)
	}
	memory := &ScriptError{Kind: ResourceLimitError, Limit: LimitMemory,
		Message: fmt.Sprintf("the memory limit of %s was exceeded", mib(l.MemoryBytes))}
	processes := &ScriptError{Kind: ResourceLimitError, Limit: LimitProcesses,
		Message: fmt.Sprintf("the process limit of %d was reached", l.Processes)}
	// A script that did not finish and ran into the memory or process limit on the way gets that limit's error,
	// whatever ended it then: on a busy machine a fork bomb or a memory hog can be slower to fail than the clock
	// is to run out, and the answer must not depend on the machine's load (the contract, "Errors").
	limitOnTheWay := func() *ScriptError {
		switch {
		case o.oomKilled:
			return memory
		case o.pidsMax:
			return processes
		}
		return nil
	}
	if o.timedOut {
		if e := limitOnTheWay(); e != nil {
			return nil, e
		}
		return nil, &ScriptError{Kind: TimeoutError, Limit: LimitWall,
			Message: fmt.Sprintf("the wall-clock limit of %s ran out", l.Wall)}
	}
	if len(o.frame) > 0 {
		switch o.frame[0] {
		case 'R':
			if o.truncated || len(o.frame)-1 > maxResult {
				return nil, &ScriptError{Kind: ResourceLimitError, Limit: LimitResult,
					Message: fmt.Sprintf("the result is larger than the limit of %d bytes", maxResult)}
			}
			raw := bytes.TrimSpace(o.frame[1:])
			if !json.Valid(raw) {
				return nil, &ScriptError{Kind: SerializationError,
					Message: "main() must return JSON-serializable data: the result is not valid JSON (nested too deeply?)"}
			}
			return json.RawMessage(raw), nil
		case 'E':
			var f errorFrame
			if o.truncated || json.Unmarshal(o.frame[1:], &f) != nil {
				break
			}
			return nil, frameError(f, o, l, memory, processes)
		}
		return nil, &ScriptError{Kind: ExecutionError, Message: "the script wrote over the result channel"}
	}
	// No frame: the script's process ended before main() returned.
	if o.oomKilled { // the OOM killer may pick any process of the jail, a forked jail's supervisor too
		return nil, memory
	}
	if o.exitCode < 0 {
		// A forked jail's supervisor ended without a status: its fork server died under it.
		return nil, fmt.Errorf("%w: the jail ended without an exit status", ErrSandbox)
	}
	if o.initKilled {
		return nil, fmt.Errorf("%w: the jail's init was killed from outside the jail (exit status %d)", ErrSandbox, o.exitCode)
	}
	if e := limitOnTheWay(); e != nil {
		return nil, e
	}
	if o.exitCode > 128 {
		sig := syscall.Signal(o.exitCode - 128)
		switch sig {
		case syscall.SIGXCPU:
			return nil, &ScriptError{Kind: TimeoutError, Limit: LimitCPU,
				Message: fmt.Sprintf("the CPU-time limit of %ds ran out", l.CPUSeconds)}
		case syscall.SIGXFSZ:
			return nil, &ScriptError{Kind: ResourceLimitError, Limit: LimitFileSize,
				Message: fmt.Sprintf("the file size limit of %d MiB was exceeded", l.FileSizeMiB)}
		}
		return nil, &ScriptError{Kind: ExecutionError,
			Message: fmt.Sprintf("the script was killed by signal %d (%s) before main() returned", int(sig), sig)}
	}
	return nil, &ScriptError{Kind: ExecutionError,
		Message: fmt.Sprintf("the script exited with status %d before main() returned", o.exitCode)}
}

func frameError(f errorFrame, o observation, l Limits, memory, processes *ScriptError) error {
	e := &ScriptError{Kind: ExecutionError, Message: f.Message, Traceback: f.Traceback}
	switch f.Kind {
	case "serialization":
		e.Kind = SerializationError
		if !strings.HasPrefix(e.Message, "main() must return JSON-serializable data") {
			e.Message = "main() must return JSON-serializable data: " + e.Message
		}
		return e
	case "missing_main":
		e.Message = "main() is missing or not callable"
		return e
	case "syntax", "exception":
	default:
		return &ScriptError{Kind: ExecutionError, Message: "the script wrote over the result channel"}
	}
	// An exception can be a limit the kernel enforced, seen from inside.
	switch {
	case f.Kind == "exception" && f.Type == "MemoryError" || o.oomKilled:
		memory.Traceback = f.Traceback
		return memory
	case syscall.Errno(f.Errno) == syscall.EFBIG:
		return &ScriptError{Kind: ResourceLimitError, Limit: LimitFileSize, Traceback: f.Traceback,
			Message: fmt.Sprintf("the file size limit of %d MiB was exceeded", l.FileSizeMiB)}
	case (o.pidsMax || o.rlimits) && (syscall.Errno(f.Errno) == syscall.EAGAIN && f.Type == "BlockingIOError" ||
		f.Type == "RuntimeError" && strings.Contains(f.Message, "can't start new thread")):
		processes.Traceback = f.Traceback
		return processes
	case syscall.Errno(f.Errno) == syscall.ENOSPC:
		return &ScriptError{Kind: ResourceLimitError, Limit: LimitDisk, Traceback: f.Traceback,
			Message: fmt.Sprintf("the writable space of /sandbox and /tmp (%s each) is full", mib(l.TmpfsBytes))}
	}
	if e.Message == "" {
		e.Message = f.Type
	}
	return e
}
