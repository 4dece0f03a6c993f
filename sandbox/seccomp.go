package sandbox

import (
	"errors"
	"fmt"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A fork server's children must be held by exactly the seccomp policy that holds a cold jail. The policy is
// written once, in nsjail.cfg, in Kafel; nsjail compiles it when it makes a jail. Rather than compile it a second
// time (and risk a second meaning), the server reads the compiled BPF program out of a real cold jail at start-up,
// with ptrace(PTRACE_SECCOMP_GET_FILTER) (root with CAP_SYS_ADMIN, a kernel with CONFIG_CHECKPOINT_RESTORE), and
// the children install that very program. Where that is not possible, there are no fork servers.

const ptraceSeccompGetFilter = 0x420c

// seccompFilters returns the seccomp programs installed in process pid, oldest first (the kernel numbers them
// so: index 0 is the first installed).
func seccompFilters(pid int) ([][]byte, error) {
	type result struct {
		filters [][]byte
		err     error
	}
	done := make(chan result, 1)
	go func() {
		// ptrace is per thread: the thread that attaches is the tracer, and must be the one that asks and detaches.
		// It is not unlocked afterwards, so the runtime retires it with this goroutine.
		runtime.LockOSThread()
		filters, err := readFilters(pid)
		done <- result{filters, err}
	}()
	r := <-done
	return r.filters, r.err
}

func readFilters(pid int) ([][]byte, error) {
	if err := unix.PtraceSeize(pid); err != nil {
		return nil, fmt.Errorf("ptrace(PTRACE_SEIZE): %w", err)
	}
	defer unix.PtraceDetach(pid)
	if err := unix.PtraceInterrupt(pid); err != nil {
		return nil, fmt.Errorf("ptrace(PTRACE_INTERRUPT): %w", err)
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, unix.WALL, nil); err != nil {
		return nil, fmt.Errorf("waiting for the tracee to stop: %w", err)
	}
	var filters [][]byte
	for i := 0; ; i++ {
		n, _, errno := syscall.Syscall6(syscall.SYS_PTRACE, ptraceSeccompGetFilter, uintptr(pid), uintptr(i), 0, 0, 0)
		if errno == unix.ENOENT {
			return filters, nil
		}
		if errno != 0 {
			return nil, fmt.Errorf("ptrace(PTRACE_SECCOMP_GET_FILTER): %w", errno)
		}
		program := make([]byte, 8*int(n)) // struct sock_filter is 8 bytes
		if len(program) == 0 {
			return nil, errors.New("an empty seccomp filter")
		}
		if _, _, errno := syscall.Syscall6(syscall.SYS_PTRACE, ptraceSeccompGetFilter, uintptr(pid), uintptr(i),
			uintptr(unsafe.Pointer(&program[0])), 0, 0); errno != 0 {
			return nil, fmt.Errorf("ptrace(PTRACE_SECCOMP_GET_FILTER): %w", errno)
		}
		filters = append(filters, program)
	}
}
