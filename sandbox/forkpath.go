package sandbox

// Whether this host allows the fork path: the fork servers are started, and each is proved with a real request,
// before any request is forked.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/internal/uids"
)

// startForking prepares and starts the fork servers, and proves the path with a real request through each. Any
// failure means no fork servers on this host: the error says why, and the caller runs every request cold.
func startForking(ctx context.Context, r *parts, set forkServerSettings) (*forking, error) {
	d, err := r.def.ForkServer()
	if err != nil {
		return nil, err
	}
	program, err := r.coldSeccompProgram(ctx)
	if err != nil {
		return nil, fmt.Errorf("reading the cold jail's seccomp filter: %w", err)
	}
	configPath := filepath.Join(r.harnessDir, "forkserver.cfg")
	scriptPath := filepath.Join(r.harnessDir, "forkserver.py")
	if err := os.WriteFile(configPath, []byte(d.Config), 0o444); err != nil {
		return nil, err
	}
	if err := os.WriteFile(scriptPath, forkServerSource, 0o444); err != nil {
		return nil, err
	}
	maskDir := filepath.Join(r.harnessDir, "mask")
	if err := os.Mkdir(maskDir, 0o755); err != nil {
		return nil, err
	}
	for i, text := range d.Masks {
		if err := os.WriteFile(filepath.Join(maskDir, strconv.Itoa(i)), []byte(text), 0o444); err != nil {
			return nil, err
		}
	}
	plan := r.newChildPlan(d, program)
	planJS, err := json.Marshal(plan)
	if err != nil {
		return nil, err
	}
	f := &forking{r: r, serverJS: planJS, maxAge: set.MaxAge, maxForks: set.MaxForks}
	f.args = append(r.commonOpts(configPath),
		"--pass_fd", "3",
		"--time_limit", "0", "--rlimit_cpu", "inf",
		"--bindmount_ro", scriptPath+":/safepy/forkserver.py",
		"--bindmount_ro", maskDir+":"+jaildef.MaskDir,
		// The whole block of uids: a child becomes the request's own (jailUID + its offset in the block) before it
		// makes its user namespace. The fork server itself is the block's first uid, which no jail is given.
		"--user", fmt.Sprintf("%d:%d:%d", jailUID, r.uids.Base, uids.BlockSize),
		"--cap", "CAP_SETUID", "--cap", "CAP_SETGID")
	for i := 0; i <= len(r.cfg.Preload); i++ {
		f.slots = append(f.slots, &forkSlot{f: f, preload: r.cfg.Preload[:i]})
	}
	for _, s := range f.slots {
		fs, err := s.start()
		if err == nil {
			err = fs.prove(ctx)
		}
		if err != nil {
			if fs != nil {
				fs.kill()
			}
			f.close()
			return nil, err
		}
		s.cur = fs
	}
	return f, nil
}

// coldSeccompProgram starts a cold jail and reads the seccomp program nsjail installed in it.
func (r *parts) coldSeccompProgram(ctx context.Context) ([]byte, error) {
	j, err := r.launchCold(nil)
	if err != nil {
		return nil, err
	}
	defer j.discard()
	ctx, cancel := context.WithTimeout(ctx, r.cfg.StartupTimeout)
	defer cancel()
	if err := j.awaitReady(ctx); err != nil {
		return nil, err
	}
	pid, err := onlyChild(j.cmd.Process.Pid)
	if err != nil {
		return nil, err
	}
	filters, err := seccompFilters(pid)
	if err != nil {
		return nil, err
	}
	if len(filters) != 1 {
		return nil, fmt.Errorf("a cold jail has %d seccomp filters, want the one of nsjail.cfg", len(filters))
	}
	return filters[0], nil
}

// prove runs a script through the fork server: the host allows everything the path needs.
func (fs *forkServer) prove(ctx context.Context) error {
	r := fs.slot.f.r
	j, err := r.launchForked(fs, fs.slot.preload, false)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, r.cfg.StartupTimeout)
	defer cancel()
	if err := j.awaitReady(ctx); err != nil {
		_, ferr := j.finish(false, nil)
		return fmt.Errorf("%w (%v)", err, ferr)
	}
	out, err := j.run(ctx, []byte("import os\ndef main():\n    return os.getuid()\n"), nil)
	if err != nil {
		return fmt.Errorf("a script in a forked jail: %w; stderr: %s", err, firstLines([]byte(out.Stderr), 4))
	}
	if string(out.Result) != strconv.Itoa(jailUID) {
		return fmt.Errorf("a script in a forked jail returned %s", out.Result)
	}
	return nil
}
