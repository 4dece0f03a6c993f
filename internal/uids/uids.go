// Package uids gives each jail alive at once a uid of its own outside, from a block of uids that owns nothing on
// the host.
package uids

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// The kernel counts several quotas per user rather than per cgroup: pipe buffer pages (fs.pipe-user-pages-soft),
// processes (RLIMIT_NPROC), descriptors in flight over Unix sockets, epoll watches. If every jail were the same
// user outside, one script could use up such a quota for all of its neighbours. So each jail alive at once is a
// uid of its own outside, taken from a block of uids that owns nothing on the host.
//
// The uids are carved into blocks of BlockSize from the configured base on. A runner claims a whole block for itself with
// an exclusive lock on a file named after it (several servers, or test runners, may share a machine; the lock goes
// with the process that holds it), and refuses a block in which any process runs, or that /etc/passwd or
// /etc/group names.
const (
	// DefaultBase is above the ranges container tools hand out (systemd-nspawn's end at 0x6FFFFFFF) and below
	// 2^31, which some tools mishandle.
	DefaultBase = 0x70000000
	BlockSize   = 1024
	blocks      = 64
)

// Block hands out the uids of one claimed block.
type Block struct {
	Base int // the block's first uid, which the fork servers run as; the jails get the others
	lock *os.File

	mu   sync.Mutex
	free []int // a stack: the most recently released is reused last
	used map[int]bool
}

// Claim claims the first free block at or above base.
func Claim(base int) (*Block, error) {
	if base <= 0 || base+blocks*BlockSize > 1<<31 {
		return nil, fmt.Errorf("uid base %d: the jails' uids must lie between 1 and 2^31", base)
	}
	named, err := namedIDs()
	if err != nil {
		return nil, err
	}
	running := runningUIDs()
	var reasons []string
	for b := 0; b < blocks; b++ {
		lo := base + b*BlockSize
		hi := lo + BlockSize
		if id, ok := anyIn(named, lo, hi); ok {
			return nil, fmt.Errorf("the jails' uid range %d-%d holds id %d, which /etc/passwd or /etc/group names; "+
				"set SAFEPY_UID_BASE to a range that owns nothing on this host", base, base+blocks*BlockSize-1, id)
		}
		lockPath := filepath.Join(os.TempDir(), fmt.Sprintf("safepy-uids-%d.lock", lo))
		f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("locking a block of uids: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			continue // another runner's
		}
		if id, ok := anyIn(running, lo, hi); ok {
			// A process of a server that died, or of something else: not ours to reuse.
			reasons = append(reasons, fmt.Sprintf("uid %d is running", id))
			unix.Flock(int(f.Fd()), unix.LOCK_UN)
			f.Close()
			continue
		}
		p := &Block{Base: lo, lock: f, used: map[int]bool{}}
		// The first uid of the block is kept back: a fork server (fork.go) runs as it.
		for id := hi - 1; id > lo; id-- {
			p.free = append(p.free, id)
		}
		return p, nil
	}
	return nil, fmt.Errorf("no free block of uids for the jails above %d (%s)", base, strings.Join(reasons, "; "))
}

func anyIn(ids map[int]bool, lo, hi int) (int, bool) {
	for id := range ids {
		if id >= lo && id < hi {
			return id, true
		}
	}
	return 0, false
}

// Take returns a uid no other jail of this runner has.
func (p *Block) Take() (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) == 0 {
		return 0, errors.New("every uid of the jails' block is in use")
	}
	id := p.free[len(p.free)-1]
	p.free = p.free[:len(p.free)-1]
	p.used[id] = true
	return id, nil
}

// Give returns a uid once every process of its jail is gone.
func (p *Block) Give(id int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.used[id] {
		return
	}
	delete(p.used, id)
	p.free = append([]int{id}, p.free...)
}

// Close releases the block.
func (p *Block) Close() {
	if p != nil && p.lock != nil {
		os.Remove(p.lock.Name())
		p.lock.Close()
	}
}

// namedIDs are the uids and gids that /etc/passwd and /etc/group name.
func namedIDs() (map[int]bool, error) {
	ids := map[int]bool{}
	for _, path := range []string{"/etc/passwd", "/etc/group"} {
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if fields := strings.Split(sc.Text(), ":"); len(fields) > 2 {
				if id, err := strconv.Atoi(fields[2]); err == nil {
					ids[id] = true
				}
			}
		}
		f.Close()
	}
	return ids, nil
}

// runningUIDs are the real uids of the processes running now.
func runningUIDs() map[int]bool {
	ids := map[int]bool{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "Uid:"); ok {
				if f := strings.Fields(v); len(f) > 0 {
					if id, err := strconv.Atoi(f[0]); err == nil {
						ids[id] = true
					}
				}
				break
			}
		}
	}
	return ids
}
