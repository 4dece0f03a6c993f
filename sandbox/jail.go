package sandbox

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/safe-py/safepy/internal/cgroup"
	"github.com/safe-py/safepy/internal/reap"
)

// startupCPUSeconds is the CPU time a jail may spend before its script arrives (starting the interpreter and, for
// a warm jail, importing numpy and pandas). The harness replaces it with the script's own limit on arrival.
const startupCPUSeconds = 20

// jail is one jail, from its start to the removal of its cgroup. It serves exactly one script. It is cold (an
// nsjail process of its own) or forked (a child of a fork server, which reports its status on a pipe); from the
// script's arrival on, the two are the same jail.
type jail struct {
	r          *parts
	cmd        *exec.Cmd   // cold: nsjail
	fs         *forkServer // forked: its fork server
	cg         cgroup.Cgroup
	uid        int // outside, this jail's alone until release
	scriptW    *os.File
	parentEnds []*os.File

	stdout, stderr, nslog *stream // nslog: cold only
	frame                 <-chan resultRead
	started               chan struct{} // closed when the harness is ready for the script
	done                  chan struct{} // closed when the jail's init has ended; exit is then set
	exit                  int           // the init's exit status (128 + signal); -1 if it is not known

	base    int64     // what counts against the jail's limit outside its cgroup (of its fork server's memory)
	begin   time.Time // the jail was started
	readyAt time.Time // the harness said it was ready
	stalled bool      // killed for not coming up within the start-up timeout
}

// launchForked asks a fork server for a jail.
func (r *parts) launchForked(fs *forkServer, preload []string, prefault bool) (*jail, error) {
	uid, err := r.uids.Take()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	limits := forkedLimits(r.limits, fs.share, prefault)
	cg, err := r.cgroups.Create(newID(), cgroupLimits(limits))
	if err != nil {
		r.uids.Give(uid)
		return nil, fmt.Errorf("%w: creating the jail's cgroup: %w", ErrSandbox, err)
	}
	// What counts against the jail's limit outside its cgroup: its share of the fork server, less the copies the
	// limit makes room for.
	j := &jail{r: r, cg: cg, uid: uid, base: r.limits.MemoryBytes - limits.MemoryBytes, started: make(chan struct{}),
		done: make(chan struct{}), begin: time.Now()}
	procs, err := cg.ProcsFiles()
	if err != nil {
		j.release()
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	defer closeFiles(procs)
	// The child's descriptors, in the order forkserver.py takes them: stdout, stderr, script, result, status.
	var fds [10]*os.File
	for i := 0; i < len(fds) && err == nil; i += 2 {
		fds[i], fds[i+1], err = os.Pipe()
	}
	stdoutR, stdoutW, stderrR, stderrW, scriptR, scriptW, resultR, resultW, statusR, statusW :=
		fds[0], fds[1], fds[2], fds[3], fds[4], fds[5], fds[6], fds[7], fds[8], fds[9]
	childEnds := []*os.File{stdoutW, stderrW, scriptR, resultW, statusW}
	j.scriptW, j.parentEnds = scriptW, []*os.File{stdoutR, stderrR, scriptW, resultR, statusR}
	if err != nil {
		closeFiles(fds[:])
		j.release()
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	err = fs.fork(uid, prefault, append(childEnds, procs...))
	closeFiles(childEnds)
	if err != nil {
		j.release()
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	j.fs = fs // from here on the fork server counts the jail among its children, until release
	j.stdout = captureAsync(stdoutR, r.cfg.MaxStdoutBytes)
	j.stderr = captureAsync(stderrR, r.cfg.MaxStderrBytes)
	j.frame = readResultAsync(resultR, j.started, r.cfg.MaxResultBytes+(64<<10))
	go func() {
		// The supervisor writes the init's status once the init has ended; a supervisor killed first writes none.
		status := make([]byte, 4)
		j.exit = -1
		if _, err := io.ReadFull(statusR, status); err == nil {
			j.exit = int(binary.BigEndian.Uint32(status))
		}
		close(j.done)
	}()
	return j, nil
}

// launchCold starts a jail with an nsjail process of its own.
func (r *parts) launchCold(preload []string) (*jail, error) {
	uid, err := r.uids.Take()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}
	cg, err := r.cgroups.Create(newID(), cgroupLimits(r.limits))
	if err != nil {
		r.uids.Give(uid)
		return nil, fmt.Errorf("%w: creating the jail's cgroup: %w", ErrSandbox, err)
	}
	// Descriptors as the jail sees them: 0 /dev/null, 1 stdout, 2 stderr, 3 script, 4 result, 5 nsjail's log.
	var fds [10]*os.File
	for i := 0; i < len(fds) && err == nil; i += 2 {
		fds[i], fds[i+1], err = os.Pipe()
	}
	stdoutR, stdoutW, stderrR, stderrW, scriptR, scriptW, resultR, resultW, logR, logW :=
		fds[0], fds[1], fds[2], fds[3], fds[4], fds[5], fds[6], fds[7], fds[8], fds[9]
	childEnds := []*os.File{stdoutW, stderrW, scriptR, resultW, logW}
	j := &jail{r: r, cg: cg, uid: uid, scriptW: scriptW, parentEnds: []*os.File{stdoutR, stderrR, scriptW, resultR, logR},
		started: make(chan struct{}), done: make(chan struct{})}
	if err != nil {
		closeFiles(fds[:])
		j.release()
		return nil, fmt.Errorf("%w: %w", ErrSandbox, err)
	}

	j.cmd = exec.Command(r.cfg.Nsjail, r.jailArgs(uid, preload)...)
	j.cmd.Env = []string{}
	j.cmd.Stdout, j.cmd.Stderr = stdoutW, stderrW
	j.cmd.ExtraFiles = []*os.File{scriptR, resultW, logW}
	// If the server dies, its jails die with it: nsjail gets SIGKILL, and the jail's init gets it from nsjail.
	j.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}

	j.begin = time.Now()
	err = cg.Start(j.cmd, r.clockSetup(), j.done)
	closeFiles(childEnds)
	if err != nil {
		j.release()
		return nil, fmt.Errorf("%w: starting nsjail: %w", ErrSandbox, err)
	}
	j.stdout = captureAsync(stdoutR, r.cfg.MaxStdoutBytes)
	j.stderr = captureAsync(stderrR, r.cfg.MaxStderrBytes)
	j.nslog = captureAsync(logR, 64<<10)
	j.frame = readResultAsync(resultR, j.started, r.cfg.MaxResultBytes+(64<<10))
	go func() {
		j.exit = exitCode(j.cmd.Wait())
		close(j.done)
	}()
	return j, nil
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		if f != nil {
			f.Close()
		}
	}
}

// kill kills every process of the jail: the cgroup's, then nsjail, whose death takes the jail's PID namespace. (A
// forked jail's processes, its supervisor too, are all in its cgroup.)
func (j *jail) kill() {
	reap.KillAll(j.cg)
	if j.cmd != nil {
		_ = j.cmd.Process.Kill()
		return
	}
	// A forked jail's first process enters the jail's cgroup as its very first step; one the fork server had not
	// yet forked, or that had not yet moved, is caught on a later round.
	go func() {
		for i := 0; i < 2000; i++ {
			select {
			case <-j.done:
				return
			case <-time.After(5 * time.Millisecond):
			}
			reap.KillAll(j.cg)
		}
	}()
}

// alive reports whether nsjail is still running.
func (j *jail) alive() bool {
	select {
	case <-j.done:
		return false
	default:
		return true
	}
}

// awaitReady waits until the harness is ready for a script. On failure the jail is killed; the caller finishes it.
func (j *jail) awaitReady(ctx context.Context) error {
	timer := time.NewTimer(j.r.cfg.StartupTimeout)
	defer timer.Stop()
	select {
	case <-j.started:
		j.readyAt = time.Now()
		return nil
	case <-j.done:
		return fmt.Errorf("%w: the jail did not start (exit status %d)", ErrSandbox, j.exit)
	case <-timer.C:
		j.stalled = true
		j.kill()
		return fmt.Errorf("%w: the jail did not start within %s", ErrSandbox, j.r.cfg.StartupTimeout)
	case <-ctx.Done():
		j.kill()
		return ctx.Err()
	}
}

// run hands the script and its files to a ready jail and waits for its answer. The script's limits count from
// here.
func (j *jail) run(ctx context.Context, script []byte, files []File) (Outcome, error) {
	// What the jail holds as the script arrives (the interpreter, and in a warm jail its preloaded modules) counts
	// against the memory limit, as it would if the script had imported them itself: warm or cold, a script has
	// the same memory. The harness resets CPU time as the script arrives.
	base := j.base + j.cg.MemoryUsage()
	runStart := time.Now()
	job := EncodeJob(script, files)
	go func() {
		j.scriptW.Write(job) // fails with EPIPE if the jail died first; the exit status tells why
		j.scriptW.Close()
	}()
	deadline := time.NewTimer(j.r.limits.Wall)
	defer deadline.Stop()
	var out Outcome
	var err error
	select {
	case res := <-j.frame:
		if res.complete {
			// The answer is in: no need to wait for the jail to wind down (a big interpreter's exit takes
			// milliseconds). Take stdout as it stands (the harness flushed it before the frame), answer, and
			// let the jail go in the background.
			out, err = j.answer(res)
			break
		}
		out, err = j.finishWith(&res, false, nil) // the channel ended without a frame: the jail is ending
	case <-j.done:
		out, err = j.finish(false, nil)
	case <-deadline.C:
		j.kill()
		out, err = j.finish(true, nil)
	case <-ctx.Done():
		j.kill()
		out, err = j.finish(false, ctx.Err())
	}
	out.Timing.Run = time.Since(runStart)
	out.BaseMemory = base
	return out, err
}

// answer decides the outcome from a complete frame, then destroys the jail in the background.
func (j *jail) answer(res resultRead) (Outcome, error) {
	// Nothing of the script runs after its answer: every process of the jail is stopped now, before stdout is
	// collected (what is in the pipe stays readable, and nothing can add to it). Killing them, waiting for the
	// kernel to take them down and removing the cgroup happen after the answer, one process at a time.
	obs := j.observe(res, false)
	peak := j.cg.MemoryPeak()
	reap.Stop(j.cg)
	if j.r.cgroups.Mode() == CgroupNone && j.cmd != nil {
		_ = j.cmd.Process.Kill() // no cgroup to stop (rlimits mode): nsjail's death takes the jail with it now
	}
	outBytes, outTrunc := j.stdout.now()
	errBytes, errTrunc := j.stderr.now()
	out := j.outcome(obs, outBytes, outTrunc, errBytes, errTrunc)
	out.PeakMemory = peak
	result, files, err := classify(obs, j.r.limits, j.r.cfg.MaxResultBytes)
	out.Result = result
	out.Files, out.FilesOmitted, out.FilesTruncated = files.Files, files.Omitted, files.Truncated
	j.r.cleanups.Add(1)
	go func() {
		defer j.r.cleanups.Done()
		reap.KillInTurn(j.cg)
		if j.cmd != nil {
			_ = j.cmd.Process.Kill()
		}
		<-j.done
		j.release()
	}()
	return out, err
}

// finish waits for nsjail's end, then decides the outcome from everything that was seen, and removes the jail.
func (j *jail) finish(timedOut bool, ctxErr error) (Outcome, error) {
	return j.finishWith(nil, timedOut, ctxErr)
}

// streamGrace bounds the wait for the jail's pipes to end once nsjail has exited and the cgroup is empty.
const streamGrace = 5 * time.Second

func (j *jail) finishWith(read *resultRead, timedOut bool, ctxErr error) (Outcome, error) {
	<-j.done
	// Only possible if nsjail itself was killed: what is left of the jail goes now, which also closes the last
	// copies of the pipes' write ends, so the readers below see their end.
	reap.KillAll(j.cg)
	// They end when the jail's last process is gone, which the kernel makes sure of; should a process ever hold
	// on regardless, closing the server's ends stops the readers all the same: no request waits on a jail forever.
	stop := time.AfterFunc(streamGrace, func() { closeFiles(j.parentEnds) })
	defer stop.Stop()
	var res resultRead
	if read != nil {
		res = *read // run took it already
	} else {
		res = <-j.frame
	}
	outBytes, outTrunc := j.stdout.wait()
	errBytes, errTrunc := j.stderr.wait()
	var logBytes []byte
	if j.nslog != nil {
		logBytes, _ = j.nslog.wait()
	}
	obs := j.observe(res, timedOut)
	if j.cmd != nil {
		// nsjail says whether the jail's init exited (with the script's status) or was itself killed.
		obs.initKilled = bytes.Contains(logBytes, []byte(") terminated with signal: "))
	}
	out := j.outcome(obs, outBytes, outTrunc, errBytes, errTrunc)
	out.PeakMemory = j.cg.MemoryPeak()
	if err := j.release(); err != nil && ctxErr == nil {
		ctxErr = fmt.Errorf("%w: removing the jail's cgroup: %v", ErrSandbox, err)
	}
	if ctxErr != nil {
		return out, ctxErr
	}
	result, files, err := classify(obs, j.r.limits, j.r.cfg.MaxResultBytes)
	if errors.Is(err, ErrSandbox) {
		err = fmt.Errorf("%w; nsjail said: %s; stderr: %s%s", err, firstLines(logBytes, 3), firstLines(errBytes, 3), hint(logBytes))
	}
	out.Result = result
	out.Files, out.FilesOmitted, out.FilesTruncated = files.Files, files.Omitted, files.Truncated
	return out, err
}

// observe gathers what the Go side saw of the jail, for classify.
func (j *jail) observe(res resultRead, timedOut bool) observation {
	obs := observation{started: res.started, stalled: j.stalled, truncated: res.truncated, timedOut: timedOut,
		rlimits: j.r.cgroups.Mode() == CgroupNone, files: res.files}
	if res.complete {
		obs.frame = res.frame
	}
	select {
	case <-j.done:
		obs.exitCode = j.exit
		if j.cmd == nil && j.exit >= 256 { // a forked jail's supervisor's account of an init killed by a signal
			obs.exitCode, obs.initKilled = j.exit-256+128, true
		}
	default: // still running: a complete frame decides alone
	}
	obs.oomKilled, obs.pidsMax = j.cg.Events()
	return obs
}

func (j *jail) outcome(obs observation, stdout []byte, truncated bool, stderr []byte, stderrTruncated bool) Outcome {
	out := Outcome{Started: obs.started, Stdout: stdoutText(stdout), StdoutTruncated: truncated,
		Stderr: stdoutText(stderr), StderrTruncated: stderrTruncated}
	if !j.readyAt.IsZero() {
		out.Timing.Startup = j.readyAt.Sub(j.begin)
	}
	return out
}

// release closes the Go side's ends of the pipes and removes the cgroup, once nsjail has exited, and gives the
// jail's uid back once none of its processes is left.
func (j *jail) release() error {
	reap.KillAll(j.cg)
	closeFiles(j.parentEnds)
	err := dropCgroup(j.cg)
	if err == nil {
		j.r.uids.Give(j.uid)
	} // else a process may be left: its uid is not given to another jail
	if j.fs != nil {
		j.fs.released()
	}
	return err
}

// discard destroys a jail that will serve no script.
func (j *jail) discard() {
	j.kill()
	_, _ = j.finish(false, context.Canceled)
}
