package uids

import (
	"os/exec"
	"syscall"
	"testing"
)

// A runner claims a block of uids no other runner holds and in which nothing runs.
func TestBlocks(t *testing.T) {
	base := DefaultBase + 32*BlockSize // away from the blocks the tests' runners claim
	// Something runs as a uid of the first block.
	squatter := startAs(t, base+7)
	defer squatter.Process.Kill()
	a, err := Claim(base)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Claim(base)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.Base == base || b.Base == base || a.Base == b.Base {
		t.Fatalf("blocks %d and %d (the first, %d, has a running process)", a.Base, b.Base, base)
	}
	ids := map[int]bool{}
	for i := 0; i < BlockSize-1; i++ {
		id, err := a.Take()
		if err != nil || ids[id] || id <= a.Base || id >= a.Base+BlockSize {
			t.Fatalf("take %d: %d %v", i, id, err)
		}
		ids[id] = true
	}
	if _, err := a.Take(); err == nil {
		t.Fatal("took more uids than the block holds")
	}
}

// startAs starts a process that sleeps as uid.
func startAs(t *testing.T, uid int) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: 65534}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}
