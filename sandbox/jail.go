package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// startupCPUSeconds is the CPU time a jail may spend before its script arrives (starting the interpreter and, for
// a warm jail, importing numpy and pandas). The harness replaces it with the script's own limit on arrival.
const startupCPUSeconds = 20

// jail is one nsjail process, from its start to the removal of its cgroup. It serves exactly one script.
type jail struct {
	r          *Runner
	cmd        *exec.Cmd
	cg         *jailCgroup
	scriptW    *os.File
	parentEnds []*os.File

	stdout, stderr, nslog <-chan capped
	frame                 <-chan resultRead
	started               chan struct{} // closed when the harness is ready for the script
	done                  chan struct{} // closed when nsjail has exited; waitErr is then set
	waitErr               error

	begin   time.Time // nsjail started
	readyAt time.Time // the harness said it was ready
	stalled bool      // killed for not coming up within the start-up timeout
}

// launch starts a jail. With preload, the harness imports the Runner's Preload modules before it reports ready.
func (r *Runner) launch(preload bool) (*jail, error) {
	cg, err := r.cgroups.create(newID(), r.limits)
	if err != nil {
		return nil, fmt.Errorf("%w: creating the jail's cgroup: %v", ErrSandbox, err)
	}
	// Descriptors as the jail sees them: 0 /dev/null, 1 stdout, 2 stderr, 3 script, 4 result, 5 nsjail's log.
	var fds [10]*os.File
	for i := 0; i < len(fds) && err == nil; i += 2 {
		fds[i], fds[i+1], err = os.Pipe()
	}
	stdoutR, stdoutW, stderrR, stderrW, scriptR, scriptW, resultR, resultW, logR, logW :=
		fds[0], fds[1], fds[2], fds[3], fds[4], fds[5], fds[6], fds[7], fds[8], fds[9]
	childEnds := []*os.File{stdoutW, stderrW, scriptR, resultW, logW}
	j := &jail{r: r, cg: cg, scriptW: scriptW, parentEnds: []*os.File{stdoutR, stderrR, scriptW, resultR, logR},
		started: make(chan struct{}), done: make(chan struct{})}
	if err != nil {
		closeFiles(fds[:])
		cg.remove()
		return nil, fmt.Errorf("%w: %v", ErrSandbox, err)
	}

	args := r.args
	if preload {
		args = append(append([]string{}, r.args...), r.cfg.Preload...)
	}
	j.cmd = exec.Command(r.cfg.Nsjail, args...)
	j.cmd.Env = []string{}
	j.cmd.Stdout, j.cmd.Stderr = stdoutW, stderrW
	j.cmd.ExtraFiles = []*os.File{scriptR, resultW, logW}
	// If the server dies, its jails die with it: nsjail gets SIGKILL, and the jail's init gets it from nsjail.
	j.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}

	j.begin = time.Now()
	err = cg.start(j.cmd)
	closeFiles(childEnds)
	if err != nil {
		closeFiles(j.parentEnds)
		cg.remove()
		return nil, fmt.Errorf("%w: starting nsjail: %v", ErrSandbox, err)
	}
	j.stdout = drainAsync(stdoutR, r.cfg.MaxStdoutBytes)
	j.stderr = drainAsync(stderrR, 64<<10)
	j.nslog = drainAsync(logR, 64<<10)
	j.frame = readResultAsync(resultR, j.started, r.cfg.MaxResultBytes+(64<<10))
	go func() {
		j.waitErr = j.cmd.Wait()
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

// kill kills every process of the jail: the cgroup's, then nsjail, whose death takes the jail's PID namespace.
func (j *jail) kill() {
	j.cg.killAll()
	_ = j.cmd.Process.Kill()
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
		return fmt.Errorf("%w: the jail did not start (nsjail exit status %d)", ErrSandbox, exitCode(j.waitErr))
	case <-timer.C:
		j.stalled = true
		j.kill()
		return fmt.Errorf("%w: the jail did not start within %s", ErrSandbox, j.r.cfg.StartupTimeout)
	case <-ctx.Done():
		j.kill()
		return ctx.Err()
	}
}

// run hands the script to a ready jail and waits for the jail to end. The script's limits count from here.
func (j *jail) run(ctx context.Context, script []byte) (Outcome, error) {
	// Memory: the script gets the limit on top of what the jail holds now (the interpreter, and in a warm jail the
	// preloaded modules). CPU time is reset by the harness as the script arrives.
	if err := j.cg.raiseMemory(j.r.limits.MemoryBytes); err != nil {
		j.kill()
		out, _ := j.finish(false, nil)
		return out, fmt.Errorf("%w: setting the jail's memory limit: %v", ErrSandbox, err)
	}
	runStart := time.Now()
	go func() {
		j.scriptW.Write(script) // fails with EPIPE if the jail died first; the exit status tells why
		j.scriptW.Close()
	}()
	deadline := time.NewTimer(j.r.limits.Wall)
	defer deadline.Stop()
	timedOut := false
	var ctxErr error
	select {
	case <-j.done:
	case <-deadline.C:
		timedOut = true
		j.kill()
	case <-ctx.Done():
		ctxErr = ctx.Err()
		j.kill()
	}
	out, err := j.finish(timedOut, ctxErr)
	out.Timing.Run = time.Since(runStart)
	return out, err
}

// finish waits for nsjail's end, removes whatever of the jail is left, and decides the outcome from what was seen.
func (j *jail) finish(timedOut bool, ctxErr error) (Outcome, error) {
	<-j.done
	// Only possible if nsjail itself was killed: what is left of the jail goes now, which also closes the last
	// copies of the pipes' write ends, so the readers below see their end.
	j.cg.killAll()
	res := <-j.frame
	outBytes, outTrunc := (<-j.stdout).get()
	errBytes, _ := (<-j.stderr).get()
	logBytes, _ := (<-j.nslog).get()
	obs := observation{started: res.started, stalled: j.stalled, frame: res.data, truncated: res.truncated,
		exitCode: exitCode(j.waitErr), timedOut: timedOut, rlimits: j.cg == nil}
	obs.oomKilled, obs.pidsMax = j.cg.events()
	closeFiles(j.parentEnds)
	if err := j.cg.remove(); err != nil && ctxErr == nil {
		ctxErr = fmt.Errorf("%w: removing the jail's cgroup: %v", ErrSandbox, err)
	}

	out := Outcome{Started: obs.started, Stdout: stdoutText(outBytes), StdoutTruncated: outTrunc, Stderr: stdoutText(errBytes)}
	if !j.readyAt.IsZero() {
		out.Timing.Startup = j.readyAt.Sub(j.begin)
	}
	if ctxErr != nil {
		return out, ctxErr
	}
	result, err := classify(obs, j.r.limits, j.r.cfg.MaxResultBytes)
	if errors.Is(err, ErrSandbox) {
		err = fmt.Errorf("%w; nsjail said: %s; stderr: %s%s", err, firstLines(logBytes, 3), firstLines(errBytes, 3), hint(logBytes))
	}
	out.Result = result
	return out, err
}

// discard destroys a jail that will serve no script.
func (j *jail) discard() {
	j.kill()
	_, _ = j.finish(false, context.Canceled)
}
