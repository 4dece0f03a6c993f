// Package pool keeps warm jails: started ahead of time, the interpreter up and its preload modules imported (if
// any), each blocked reading its script. A request takes one if one is ready; if none is, it waits for one the
// pool is forking (started before the request came, so ready sooner than one made now), and otherwise starts a
// jail itself. Each warm jail serves one script and is destroyed; every request still gets its own namespaces,
// cgroup, /sandbox and /tmp. One goroutine refills the pool, and only while the service is not busy (Config.Busy):
// a saturated service spends no CPU on jails it cannot use before the load drops, and runs exactly as it would
// with no pool. Forked jails come up several at once; cold ones, which cost an interpreter's start each, one at a
// time between all pools (Config.Turn).
//
// A forked warm jail normally also copies, while it waits, the fork server's pages a typical script writes
// (prefault). While requests come back to back that would only delay the next one, which takes the jail as soon as
// it is ready: such jails are made bare (no prefault; the same memory limit as a jail forked for a request on the
// spot), and replaced by prefaulted ones when requests stop coming.
//
// The pool knows jails only through Jail and the starts in Config, and time only through Clock: its policy is
// tested with fakes, without root or real jails.
package pool

import (
	"context"
	"sync"
	"time"
)

// Jail is what the pool holds: one jail from its start until it serves a script or is destroyed.
type Jail interface {
	// AwaitReady waits until the jail is ready for a script. A jail that does not come up is destroyed by it.
	AwaitReady(ctx context.Context) error
	Alive() bool
	Began() time.Time   // when its start was asked for
	ReadyAt() time.Time // when it came up
	// Discard destroys a jail that will serve no script; it returns once the jail is gone.
	Discard()
}

// Clock is the pool's time: the real one in the service, a hand-moved one in tests.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Config is what a pool keeps and how it makes its jails.
type Config[J Jail] struct {
	Size   int
	MaxAge time.Duration // a jail older than this is destroyed without serving

	// Fork forks a jail, prefaulted or bare, which comes up in the background (AwaitReady). An error (there is no
	// fork server for the pool, or the fork failed) sends the pool the cold way, in turn.
	Fork func(prefault bool) (J, error)
	// Start starts a jail the way that costs an interpreter's start (forked and prefaulted if a fork server has
	// come up since, else cold); the pool holds Turn until the jail is up.
	Start func() (J, error)

	Busy  func() bool   // nil: never busy
	Turn  chan struct{} // one token shared by the pools that start cold jails; nil: one of the pool's own
	Clock Clock         // nil: the real one
}

type entry[J Jail] struct {
	j    J
	bare bool // forked without prefaulting (requests were coming back to back)
}

// Pool is a pool of warm jails of one kind.
type Pool[J Jail] struct {
	cfg   Config[J]
	clock Clock

	mu       sync.Mutex
	ready    []entry[J] // oldest first
	closed   bool
	lastTake time.Time
	hold     bool          // the last take came long after the one before: its refill waits for its answer
	gap      time.Duration // moving average of the time between takes
	// prefaultTook is a moving average of how long a prefaulted jail took from its fork to ready (0 until one did).
	prefaultTook time.Duration
	pending      int           // jails forked ahead that are not ready yet
	waiting      int           // requests waiting for one of them
	arrived      chan struct{} // closed when one of them is ready or failed
	bareIdle     time.Duration // how long a bare jail may wait before it is replaced by a prefaulted one
	backoff      time.Duration // after failed starts: the pool starts no jail before retryAt
	retryAt      time.Time

	wake chan struct{} // a jail was taken, or one may have aged
	stop chan struct{}
	wg   sync.WaitGroup // the refill loop, jails coming up, and jails being destroyed
}

// New starts a pool and, if its size is above 0, its refill.
func New[J Jail](cfg Config[J]) *Pool[J] {
	if cfg.Busy == nil {
		cfg.Busy = func() bool { return false }
	}
	if cfg.Turn == nil {
		cfg.Turn = make(chan struct{}, 1)
	}
	p := &Pool[J]{cfg: cfg, clock: cfg.Clock, wake: make(chan struct{}, 1), stop: make(chan struct{}),
		arrived: make(chan struct{}), bareIdle: Seldom}
	if p.clock == nil {
		p.clock = realClock{}
	}
	if cfg.Size > 0 {
		p.wg.Add(1)
		go p.refill()
	}
	return p
}

// Size is how many jails the pool keeps.
func (p *Pool[J]) Size() int { return p.cfg.Size }

// Take returns a ready warm jail, or false if there is none.
func (p *Pool[J]) Take() (J, bool) {
	if p.cfg.Size == 0 {
		var none J
		return none, false
	}
	defer p.Poke()
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.clock.Now()
	p.hold = now.Sub(p.lastTake) > Seldom
	if !p.lastTake.IsZero() {
		p.gap = average(p.gap, now.Sub(p.lastTake))
	}
	p.lastTake = now
	return p.takeLocked()
}

func (p *Pool[J]) takeLocked() (J, bool) {
	for len(p.ready) > 0 {
		e := p.ready[0]
		p.ready = p.ready[1:]
		if p.usable(e.j) {
			return e.j, true
		}
		// In the background: destroying a jail waits for it to end, which the request must not. A jail in ready
		// means the pool is not closed yet, so Close waits for this one.
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			e.j.Discard()
		}()
	}
	var none J
	return none, false
}

// AwaitForming waits for one of the jails the pool is forking ahead, if there is one no other request waits for
// already: it started earlier than a jail made now would, so it is ready sooner, and the CPU a second jail would
// cost goes to the ones under way instead. It returns false, at once or after limit, if there is none to wait
// for.
func (p *Pool[J]) AwaitForming(ctx context.Context, limit time.Duration) (J, bool) {
	timeout := p.clock.After(limit)
	var none J
	p.mu.Lock()
	p.waiting++
	for {
		// Leaving, the waiter stops counting in the same hold of the lock in which it took a jail or gave up: a
		// jail it leaves to the others counts for them at once.
		if j, ok := p.takeLocked(); ok {
			p.waiting--
			p.mu.Unlock()
			return j, true
		}
		if p.pending < p.waiting || p.closed {
			p.waiting--
			p.mu.Unlock()
			return none, false
		}
		arrived := p.arrived
		p.mu.Unlock()
		select {
		case <-arrived:
			p.mu.Lock()
			continue
		case <-timeout:
		case <-ctx.Done():
		}
		p.mu.Lock()
		p.waiting--
		p.mu.Unlock()
		return none, false
	}
}

// Poke has the refill look again: a jail was taken, or an execution ended (the service may no longer be busy).
func (p *Pool[J]) Poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// When requests come seldom (more than Seldom apart), a pool that still holds a jail waits refillDelay after one
// was taken before it makes the next: until the taken jail's answer is out. Making a jail (a fork server's fork and
// the child's prefault, or an nsjail's start) takes milliseconds of CPU, which on a small machine would come out
// of that answer's time, and there is time enough before the next request. When they come back to back, or the
// pool is empty, it refills at once: the next request is about to need the jail.
const (
	refillDelay = 10 * time.Millisecond
	Seldom      = 100 * time.Millisecond
)

// holdOff is how much longer the pool waits before refilling.
func (p *Pool[J]) holdOff() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.hold || len(p.ready) == 0 {
		return 0
	}
	return max(refillDelay-p.clock.Now().Sub(p.lastTake), 0)
}

// Count is how many warm jails are waiting.
func (p *Pool[J]) Count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready)
}

// refill keeps the pool full and replaces jails that reached their maximum age or died.
func (p *Pool[J]) refill() {
	defer p.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // closing the pool abandons a start under way
		<-p.stop
		cancel()
	}()
	for ctx.Err() == nil {
		p.recycle()
		if d := p.holdOff(); d > 0 && p.Count() < p.cfg.Size {
			select {
			case <-p.stop:
				return
			case <-p.wake: // another take: it may have emptied the pool
			case <-p.clock.After(d):
			}
			continue
		}
		if p.short() && !p.cfg.Busy() && p.retryIn() == 0 {
			if p.forkAhead(ctx) {
				continue
			}
			if p.turn(ctx) {
				j, err := p.cfg.Start()
				if err == nil {
					err = j.AwaitReady(ctx)
				}
				<-p.cfg.Turn
				if err != nil && ctx.Err() != nil {
					return // closing
				}
				p.mu.Lock()
				p.startedLocked(err)
				added := err == nil && p.addLocked(entry[J]{j: j})
				p.mu.Unlock()
				if err == nil && !added {
					j.Discard()
					return
				}
				if added {
					continue
				}
			}
		}
		wait := p.cfg.MaxAge / 4
		if d := p.retryIn(); d > 0 {
			wait = d
		} else if p.short() {
			wait = 50 * time.Millisecond // busy: look again soon (an execution's end also wakes the pool)
		} else if p.Settled() < p.cfg.Size {
			wait = min(wait, p.idleLimit()) // a bare jail to replace soon
		}
		select {
		case <-p.stop:
			return
		case <-p.wake:
		case <-p.clock.After(wait):
		}
	}
}

// startedLocked records how a start went: after a failure the pool starts no jail for a while, doubling the pause
// with each failure in a row. The cold path still works if the sandbox does; a start that failed would most
// likely fail again, and the pool must not spin on it.
func (p *Pool[J]) startedLocked(err error) {
	if err == nil {
		p.backoff = 0
		return
	}
	p.backoff = min(max(2*p.backoff, 100*time.Millisecond), 10*time.Second)
	p.retryAt = p.clock.Now().Add(p.backoff)
}

// retryIn is how long the pool still pauses after a failed start.
func (p *Pool[J]) retryIn() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return max(p.retryAt.Sub(p.clock.Now()), 0)
}

func (p *Pool[J]) idleLimit() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bareIdle
}

// Settled is how many warm jails are waiting that the pool would keep if no request came: those not bare.
func (p *Pool[J]) Settled() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, e := range p.ready {
		if !e.bare {
			n++
		}
	}
	return n
}

// forkAhead forks a jail and lets it come up in the background: a fork costs the fork server a millisecond, and
// the rest of a forked jail's start happens in the child, much of it waiting (for the kernel to move it into its
// cgroup, for a CPU), so several can come up at once, which keeps up with a sustained load that one start at a
// time could not. Cold starts (an interpreter each, hundreds of milliseconds of CPU) still take turns. It returns
// false if the pool has no fork server, or the fork failed.
func (p *Pool[J]) forkAhead(ctx context.Context) bool {
	// Copying ahead what a script would write saves a waiting jail's script that time; a jail that a request will
	// take as soon as it is ready (requests come back to back) would only make that request wait for all of it,
	// where its script copies only what it writes.
	p.mu.Lock()
	closed := p.closed
	// Also while requests come back to back, if they come far enough apart for a prefaulted jail to be ready
	// before a request takes it: the pool keeps size jails ready or forming, so the one forked now is taken about
	// size requests from now (with a quarter to spare). A plot's request takes tens of milliseconds; its jail then
	// copies, while the requests before it run, what its script would otherwise copy on its own time.
	prefault := p.hold || p.clock.Now().Sub(p.lastTake) > Seldom ||
		p.prefaultTook > 0 && p.gap*time.Duration(p.cfg.Size) > p.prefaultTook*5/4
	p.mu.Unlock()
	if closed || ctx.Err() != nil {
		return false
	}
	j, err := p.cfg.Fork(prefault)
	if err != nil {
		return false // the cold way, in turn
	}
	p.mu.Lock()
	p.pending++
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		err := j.AwaitReady(ctx)
		p.mu.Lock()
		p.pending--
		if err == nil && prefault {
			p.prefaultTook = average(p.prefaultTook, j.ReadyAt().Sub(j.Began()))
		}
		added := err == nil && p.addLocked(entry[J]{j: j, bare: !prefault})
		if ctx.Err() == nil {
			p.startedLocked(err)
		}
		close(p.arrived) // a jail came, or one will not: the waiters look again
		p.arrived = make(chan struct{})
		p.mu.Unlock()
		if err == nil && !added {
			j.Discard()
		}
		p.Poke()
	}()
	return true
}

// usable reports whether a ready jail may still serve: alive, and younger than the pool's maximum age.
func (p *Pool[J]) usable(j J) bool {
	return j.Alive() && p.clock.Now().Sub(j.ReadyAt()) < p.cfg.MaxAge
}

// addLocked puts a jail that came up into the pool, and reports false if the pool is closed: the caller then
// discards the jail.
func (p *Pool[J]) addLocked(e entry[J]) bool {
	if p.closed {
		return false
	}
	p.ready = append(p.ready, e)
	return true
}

// short reports whether the pool holds, ready or forming, fewer jails than its size.
func (p *Pool[J]) short() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready)+p.pending < p.cfg.Size
}

// turn waits for the pools' shared token, which lets one jail start at a time between all pools.
func (p *Pool[J]) turn(ctx context.Context) bool {
	select {
	case p.cfg.Turn <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

// recycle destroys the jails that are too old or dead, and the bare ones once requests have stopped coming back
// to back (none for bareIdle): the next request may come seldom, and should find a prefaulted jail.
func (p *Pool[J]) recycle() {
	p.mu.Lock()
	now := p.clock.Now()
	var keep, drop []entry[J]
	for _, e := range p.ready {
		// Bare ones go once requests have stopped coming back to back.
		restless := e.bare && now.Sub(e.j.ReadyAt()) > p.bareIdle && now.Sub(p.lastTake) > p.bareIdle
		if p.usable(e.j) && !restless {
			keep = append(keep, e)
		} else {
			drop = append(drop, e)
		}
	}
	p.ready = keep
	p.mu.Unlock()
	for _, e := range drop {
		e.j.Discard()
	}
}

// Close stops refilling and destroys the warm jails.
func (p *Pool[J]) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	ready := p.ready
	p.ready = nil
	p.mu.Unlock()
	close(p.stop)
	p.wg.Wait()
	for _, e := range ready {
		e.j.Discard()
	}
}

// average is a moving average of durations that follows a change within a few of them; the first one sets it.
func average(avg, d time.Duration) time.Duration {
	if avg == 0 {
		return d
	}
	return (3*avg + d) / 4
}
