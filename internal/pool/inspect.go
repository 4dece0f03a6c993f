package pool

import "time"

// What follows lets the sandbox's real-jail tests see into a pool and steer it without depending on timing: a
// loaded machine may take longer than Seldom between two steps of a test.

// State is what a pool holds at one moment.
type State[J Jail] struct {
	Ready   []J    // oldest first
	Bare    []bool // Bare[i]: Ready[i] was forked without prefaulting
	Forming int    // jails forked ahead that are not ready yet
	Waiting int    // requests waiting for one of them
}

// State reports what the pool holds.
func (p *Pool[J]) State() State[J] {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := State[J]{Forming: p.pending, Waiting: p.waiting}
	for _, e := range p.ready {
		s.Ready = append(s.Ready, e.j)
		s.Bare = append(s.Bare, e.bare)
	}
	return s
}

// SetBareIdle sets how long a bare jail may wait before it is replaced by a prefaulted one (Seldom unless set).
func (p *Pool[J]) SetBareIdle(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.bareIdle = d
}

// SetLastTake has the pool take the last request to have come at t, and not long after the one before it: a t
// in the future has the pool take requests to be coming back to back until then, so it forks its jails bare.
func (p *Pool[J]) SetLastTake(t time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.hold, p.lastTake = false, t
}

// Remove takes a ready jail out of the pool without counting it as a request's, or returns false if there is none.
func (p *Pool[J]) Remove() (J, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.takeLocked()
}
