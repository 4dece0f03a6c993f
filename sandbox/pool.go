package sandbox

import (
	"context"
	"sync"
	"time"
)

// pool keeps warm jails: started ahead of time, the interpreter up and its preload modules imported (if any), each
// blocked reading its script. A request takes one if one is ready and otherwise starts a cold jail itself, so the pool can
// only make a request faster, never refuse or delay it. Each warm jail serves one script and is destroyed; every
// request still gets its own namespaces, cgroup, /sandbox and /tmp. One goroutine refills the pool, one jail at a
// time, and only while the service is not busy (Config.Busy): a saturated service spends no CPU on jails it cannot
// use before the load drops, and runs exactly as it would with no pool.
type pool struct {
	r       *Runner
	size    int
	maxAge  time.Duration
	preload []string // what its jails import before they are ready

	mu       sync.Mutex
	ready    []*jail // oldest first
	closed   bool
	lastTake time.Time
	hold     bool // the last take came long after the one before: its refill waits for its answer

	wake chan struct{} // a jail was taken, or one may have aged
	stop chan struct{}
	wg   sync.WaitGroup
}

func newPool(r *Runner, size int, maxAge time.Duration, preload []string) *pool {
	p := &pool{r: r, size: size, maxAge: maxAge, preload: preload, wake: make(chan struct{}, 1), stop: make(chan struct{})}
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
	p.lastTake = now
	for len(p.ready) > 0 {
		j := p.ready[0]
		p.ready = p.ready[1:]
		if j.alive() && time.Since(j.readyAt) < p.maxAge {
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
	backoff := time.Duration(0)
	for {
		p.recycle()
		if d := p.holdOff(); d > 0 && p.count() < p.size {
			select {
			case <-p.stop:
				return
			case <-time.After(d):
			}
			continue
		}
		if p.count() < p.size && !p.r.cfg.Busy() && p.turn(ctx) {
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
			if err != nil {
				// The cold path still works if the sandbox does; do not spin on a failing start.
				backoff = min(max(2*backoff, 100*time.Millisecond), 10*time.Second)
			} else {
				backoff = 0
				p.mu.Lock()
				if p.closed {
					p.mu.Unlock()
					j.discard()
					return
				}
				p.ready = append(p.ready, j)
				p.mu.Unlock()
				continue
			}
		}
		wait := p.maxAge / 4
		if backoff > 0 {
			wait = backoff
		} else if p.count() < p.size {
			wait = 50 * time.Millisecond // busy: look again soon (an execution's end also wakes the pool)
		}
		select {
		case <-p.stop:
			return
		case <-p.wake:
		case <-time.After(wait):
		}
	}
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

// recycle destroys the jails that are too old or dead.
func (p *pool) recycle() {
	p.mu.Lock()
	var keep, drop []*jail
	for _, j := range p.ready {
		if j.alive() && time.Since(j.readyAt) < p.maxAge {
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
