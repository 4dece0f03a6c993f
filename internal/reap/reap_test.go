package reap

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestStateIn(t *testing.T) {
	for _, tt := range []struct {
		stat, states string
		want         bool
	}{
		{"12 (python3) S 1 12", "TtZX", false},
		{"12 (python3) T 1 12", "TtZX", true},
		{"12 (python3) Z 1 12", "ZX", true},
		{"12 (a) R (b) T 1 12", "T", true}, // the name holds ") R ": the last ')' ends it
		{"12 (a) T) R 1 12", "T", false},
		{"", "T", true},
		{"12 (x)", "T", true},
	} {
		if got := stateIn([]byte(tt.stat), tt.states); got != tt.want {
			t.Errorf("%q in %q: %v", tt.stat, tt.states, got)
		}
	}
}

func TestStopPending(t *testing.T) {
	for _, tt := range []struct {
		status string
		want   bool
	}{
		{"Name:\tpython3\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000040000\n", true},  // bit 18: SIGSTOP (19)
		{"Name:\tpython3\nSigPnd:\t0000000000040000\nShdPnd:\t0000000000000000\n", false}, // a thread's own does not count
		{"ShdPnd:\t0000000000000100\n", false},
		{"Name:\tpython3\n", false},
		{"ShdPnd:\tzz\n", false},
	} {
		if got := stopPending([]byte(tt.status)); got != tt.want {
			t.Errorf("%q: %v", tt.status, got)
		}
	}
}

// group is a group of this process's children, all of which it contains unless out says otherwise.
type group struct {
	pids   []int
	out    map[int]bool
	killed int
}

func (g *group) Procs() []int          { return g.pids }
func (g *group) Contains(pid int) bool { return !g.out[pid] }
func (g *group) Kill()                 { g.killed++ }

func sleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// state is a process's state as /proc/PID/stat has it; X once it is gone.
func state(pid int) byte {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 'X'
	}
	s := string(data)
	return s[strings.LastIndexByte(s, ')')+2]
}

// await waits up to 5 s for a process to be in one of the states, and returns the state it is in.
func await(pid int, states string) byte {
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(states, string(state(pid))) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	return state(pid)
}

func TestStopContinueKill(t *testing.T) {
	a, b := sleeper(t), sleeper(t)
	g := &group{pids: []int{a.Process.Pid, b.Process.Pid, a.Process.Pid, 0, os.Getpid()}}
	Stop(g)
	// Stop returns once every stop is pending; it takes effect when the kernel next schedules the process.
	for _, c := range []*exec.Cmd{a, b} {
		if s := await(c.Process.Pid, "T"); s != 'T' {
			t.Fatalf("state %c after Stop", s)
		}
	}
	if !Signal(g, unix.SIGCONT) {
		t.Fatal("no process found")
	}
	if s := await(a.Process.Pid, "SR"); s != 'S' && s != 'R' {
		t.Fatalf("state %c after SIGCONT", s)
	}
	KillInTurn(g)
	for _, c := range []*exec.Cmd{a, b} {
		if s := state(c.Process.Pid); s != 'Z' {
			t.Fatalf("state %c after KillInTurn", s)
		}
	}
	if g.killed != 0 {
		t.Fatal("KillInTurn killed all at once")
	}
	if SignalAll(g); g.killed != 1 {
		t.Fatal("SignalAll did not kill at once first")
	}
}

// A pid the group no longer contains (reused, or moved out) is never signalled.
func TestOnlyWhatTheGroupContains(t *testing.T) {
	a := sleeper(t)
	g := &group{pids: []int{a.Process.Pid}, out: map[int]bool{a.Process.Pid: true}}
	SignalAll(g)
	KillInTurn(g)
	if s := state(a.Process.Pid); s != 'S' && s != 'R' {
		t.Fatalf("state %c: a process outside the group was signalled", s)
	}
}
