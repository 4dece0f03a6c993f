package cgroup

import (
	"os"
	"os/exec"
)

// none is rlimits mode: no cgroups. Its jails' limits are nsjail's rlimits; there is nothing to create, read or
// remove, and no process is ever listed (so none is found to signal).
type none struct{}

func (none) Mode() Mode                            { return None }
func (none) Create(string, Limits) (Cgroup, error) { return none{}, nil }
func (none) Close()                                {}
func (none) limitAll(int64) error                  { return nil }

// Start starts cmd on a locked thread all the same: setup may change the thread for good.
func (none) Start(cmd *exec.Cmd, setup func() error, ended <-chan struct{}) error {
	return startLocked(setup, ended, func() (bool, error) { return true, cmd.Start() })
}

func (none) Dirs() []string                    { return nil }
func (none) ProcsFiles() ([]*os.File, error)   { return nil, nil }
func (none) Procs() []int                      { return nil }
func (none) Contains(int) bool                 { return false }
func (none) Kill()                             {}
func (none) MemoryPeak() int64                 { return 0 }
func (none) MemoryUsage() int64                { return 0 }
func (none) MemoryHeld() int64                 { return 0 }
func (none) Events() (oomKilled, pidsMax bool) { return false, false }
func (none) Remove() error                     { return nil }
