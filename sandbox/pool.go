package sandbox

import (
	"context"
	"sync"
	"time"
)

// pool keeps warm jails: started ahead of time, the interpreter up and its preload modules imported (if any), each
// blocked reading its script. A request takes one if one is ready; if none is, it waits for one the pool is forking
// (started before the request came, so ready sooner than one made now), and otherwise starts a jail itself. Each
// warm jail serves one script and is destroyed; every request still gets its own namespaces, cgroup, /sandbox and
// /tmp. One goroutine refills the pool, and only while the service is not busy (Config.Busy): a saturated service
// spends no CPU on jails it cannot use before the load drops, and runs exactly as it would with no pool. Forked
// jails come up several at once; cold ones, which cost an interpreter's start each, one at a time between all
// pools.
//
// A forked warm jail normally also copies, while it waits, the fork server's pages a typical script writes
// (prefault). While requests come back to back that would only delay the next one, which takes the jail as soon as
// it is ready: such jails are made bare (no prefault; the same memory limit as a jail forked for a request on the
// spot), and replaced by prefaulted ones when requests stop coming.
type pool struct {
	r       *Runner
	size    int
	maxAge  time.Duration
	preload []string // what its jails import before they are ready

	mu       sync.Mutex
	ready    []*jail // oldest first
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
	wg   sync.WaitGroup
}

func newPool(r *Runner, size int, maxAge time.Duration, preload []string) *pool {
	p := &pool{r: r, size: size, maxAge: maxAge, preload: preload, wake: make(chan struct{}, 1), stop: make(chan struct{}),
		arrived: make(chan struct{}), bareIdle: seldom}
	if size > 0 {
		p.wg.Add(1)
		go p.refill()
	}
	return p
}

// take returns a ready warm jail, or nil if there is none.
func (p *pool) take() *jail {
	if p.size == 0 {
		return nil
	}
	defer p.poke()
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	p.hold = now.Sub(p.lastTake) > seldom
	if !p.lastTake.IsZero() {
		p.gap = average(p.gap, now.Sub(p.lastTake))
	}
	p.lastTake = now
	return p.takeLocked()
}

func (p *pool) takeLocked() *jail {
	for len(p.ready) > 0 {
		j := p.ready[0]
		p.ready = p.ready[1:]
		if p.usable(j) {
			return j
		}
		p.r.cleanups.Add(1)
		go func() {
			defer p.r.cleanups.Done()
			j.discard()
		}()
	}
	return nil
}

// awaitForming waits for one of the jails the pool is forking ahead, if there is one no other request waits for
// already: it started earlier than a jail made now would, so it is ready sooner, and the CPU a second jail would
// cost goes to the ones under way instead. It returns nil, at once or after limit, if there is none to wait for.
func (p *pool) awaitForming(ctx context.Context, limit time.Duration) *jail {
	timer := time.NewTimer(limit)
	defer timer.Stop()
	p.mu.Lock()
	p.waiting++
	for {
		// Leaving, the waiter stops counting in the same hold of the lock in which it took a jail or gave up: a
		// jail it leaves to the others counts for them at once.
		if j := p.takeLocked(); j != nil {
			p.waiting--
			p.mu.Unlock()
			return j
		}
		if p.pending < p.waiting || p.closed {
			p.waiting--
			p.mu.Unlock()
			return nil
		}
		arrived := p.arrived
		p.mu.Unlock()
		select {
		case <-arrived:
			p.mu.Lock()
			continue
		case <-timer.C:
		case <-ctx.Done():
		}
		p.mu.Lock()
		p.waiting--
		p.mu.Unlock()
		return nil
	}
}

func (p *pool) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// When requests come seldom (more than seldom apart), a pool that still holds a jail waits refillDelay after one
// was taken before it makes the next: until the taken jail's answer is out. Making a jail (a fork server's fork and
// the child's prefault, or an nsjail's start) takes milliseconds of CPU, which on a small machine would come out
// of that answer's time, and there is time enough before the next request. When they come back to back, or the
// pool is empty, it refills at once: the next request is about to need the jail.
const (
	refillDelay = 10 * time.Millisecond
	seldom      = 100 * time.Millisecond
)

// holdOff is how much longer the pool waits before refilling.
func (p *pool) holdOff() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.hold || len(p.ready) == 0 {
		return 0
	}
	return max(refillDelay-time.Since(p.lastTake), 0)
}

// count is how many warm jails are waiting.
func (p *pool) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready)
}

// refill keeps the pool full and replaces jails that reached their maximum age or died.
func (p *pool) refill() {
	defer p.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // closing the pool abandons a start under way
		<-p.stop
		cancel()
	}()
	for ctx.Err() == nil {
		p.recycle()
		if d := p.holdOff(); d > 0 && p.count() < p.size {
			select {
			case <-p.stop:
				return
			case <-p.wake: // another take: it may have emptied the pool
			case <-time.After(d):
			}
			continue
		}
		if p.short() && !p.r.cfg.Busy() && p.retryIn() == 0 {
			if p.forkAhead(ctx) {
				continue
			}
			if p.turn(ctx) {
				j, err := p.r.launch(p.preload, true)
				if err == nil {
					if err = j.awaitReady(ctx); err != nil {
						j.finish(false, err)
					}
				}
				<-p.r.refilling
				if err != nil && ctx.Err() != nil {
					return // closing
				}
				p.mu.Lock()
				p.startedLocked(err)
				added := err == nil && p.addLocked(j)
				p.mu.Unlock()
				if err == nil && !added {
					j.discard()
					return
				}
				if added {
					continue
				}
			}
		}
		wait := p.maxAge / 4
		if d := p.retryIn(); d > 0 {
			wait = d
		} else if p.short() {
			wait = 50 * time.Millisecond // busy: look again soon (an execution's end also wakes the pool)
		} else if p.settled() < p.size {
			wait = min(wait, p.idleLimit()) // a bare jail to replace soon
		}
		select {
		case <-p.stop:
			return
		case <-p.wake:
		case <-time.After(wait):
		}
	}
}

// startedLocked records how a start went: after a failure the pool starts no jail for a while, doubling the pause
// with each failure in a row. The cold path still works if the sandbox does; a start that failed would most
// likely fail again, and the pool must not spin on it.
func (p *pool) startedLocked(err error) {
	if err == nil {
		p.backoff = 0
		return
	}
	p.backoff = min(max(2*p.backoff, 100*time.Millisecond), 10*time.Second)
	p.retryAt = time.Now().Add(p.backoff)
}

// retryIn is how long the pool still pauses after a failed start.
func (p *pool) retryIn() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return max(time.Until(p.retryAt), 0)
}

func (p *pool) idleLimit() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bareIdle
}

// settled is how many warm jails are waiting that the pool would keep if no request came: those not bare.
func (p *pool) settled() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, j := range p.ready {
		if !j.bare {
			n++
		}
	}
	return n
}

// forkAhead asks the pool's fork server for a jail and lets it come up in the background: a fork costs the fork
// server a millisecond, and the rest of a forked jail's start happens in the child, much of it waiting (for the
// kernel to move it into its cgroup, for a CPU), so several can come up at once, which keeps up with a sustained
// load that one start at a time could not. Cold starts (an interpreter each, hundreds of milliseconds of CPU)
// still take turns. It returns false if there is no fork server for the pool.
func (p *pool) forkAhead(ctx context.Context) bool {
	// Copying ahead what a script would write saves a waiting jail's script that time; a jail that a request will
	// take as soon as it is ready (requests come back to back) would only make that request wait for all of it,
	// where its script copies only what it writes.
	p.mu.Lock()
	closed := p.closed
	// Also while requests come back to back, if they come far enough apart for a prefaulted jail to be ready
	// before a request takes it: the pool keeps size jails ready or forming, so the one forked now is taken about
	// size requests from now (with a quarter to spare). A plot's request takes tens of milliseconds; its jail then
	// copies, while the requests before it run, what its script would otherwise copy on its own time.
	prefault := p.hold || time.Since(p.lastTake) > seldom ||
		p.prefaultTook > 0 && p.gap*time.Duration(p.size) > p.prefaultTook*5/4
	p.mu.Unlock()
	if closed || ctx.Err() != nil {
		return false
	}
	fs := p.r.forks.server(p.preload)
	if fs == nil {
		return false
	}
	j, err := p.r.launchForked(fs, p.preload, prefault)
	if err != nil {
		p.r.logForkFailure(err)
		return false // the cold way, in turn
	}
	j.bare = !prefault
	p.mu.Lock()
	p.pending++
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		err := j.awaitReady(ctx)
		if err != nil {
			j.finish(false, err)
		}
		p.mu.Lock()
		p.pending--
		if err == nil && prefault {
			p.prefaultTook = average(p.prefaultTook, j.readyAt.Sub(j.begin))
		}
		added := err == nil && p.addLocked(j)
		if ctx.Err() == nil {
			p.startedLocked(err)
		}
		close(p.arrived) // a jail came, or one will not: the waiters look again
		p.arrived = make(chan struct{})
		p.mu.Unlock()
		if err == nil && !added {
			j.discard()
		}
		p.poke()
	}()
	return true
}

// usable reports whether a ready jail may still serve: alive, and younger than the pool's maximum age.
func (p *pool) usable(j *jail) bool { return j.alive() && time.Since(j.readyAt) < p.maxAge }

// addLocked puts a jail that came up into the pool, and reports false if the pool is closed: the caller then
// discards the jail.
func (p *pool) addLocked(j *jail) bool {
	if p.closed {
		return false
	}
	p.ready = append(p.ready, j)
	return true
}

// short reports whether the pool holds, ready or forming, fewer jails than its size.
func (p *pool) short() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready)+p.pending < p.size
}

// turn waits for the pools' shared token, which lets one jail start at a time between all pools.
func (p *pool) turn(ctx context.Context) bool {
	select {
	case p.r.refilling <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

// recycle destroys the jails that are too old or dead, and the bare ones once requests have stopped coming back
// to back (none for bareIdle): the next request may come seldom, and should find a prefaulted jail.
func (p *pool) recycle() {
	p.mu.Lock()
	var keep, drop []*jail
	for _, j := range p.ready {
		// Bare ones go once requests have stopped coming back to back.
		restless := j.bare && time.Since(j.readyAt) > p.bareIdle && time.Since(p.lastTake) > p.bareIdle
		if p.usable(j) && !restless {
			keep = append(keep, j)
		} else {
			drop = append(drop, j)
		}
	}
	p.ready = keep
	p.mu.Unlock()
	for _, j := range drop {
		j.discard()
	}
}

// close stops refilling and destroys the warm jails.
func (p *pool) close() {
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
	for _, j := range ready {
		j.discard()
	}
}

// average is a moving average of durations that follows a change within a few of them; the first one sets it.
func average(avg, d time.Duration) time.Duration {
	if avg == 0 {
		return d
	}
	return (3*avg + d) / 4
}
