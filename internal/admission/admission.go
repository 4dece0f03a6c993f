// Package admission bounds how many executions run at once and how long a request may wait for a turn.
//
// Requests wait in one first-come, first-served queue. A request is admitted to the queue only if it is likely to
// get a slot within the wait: the gate predicts its wait from its place in the queue and from how long recent
// executions held their slots. One that is not likely to be served in time is refused at once, with a Retry-After
// that says when a retry is likely to be admitted, instead of hanging for the whole wait and being refused then.
// Whenever the queue moves, the gate checks its tail again and refuses at once whoever can no longer make it.
package admission

import (
	"container/list"
	"context"
	"errors"
	"math"
	"sync"
	"time"
)

// ErrOverloaded is returned when a request is unlikely to get a slot within the wait, or did not get one.
var ErrOverloaded = errors.New("overloaded")

// Refusal is the error of a refused request; it wraps ErrOverloaded and says when a retry is likely to succeed.
type Refusal struct {
	RetryAfter time.Duration
}

func (r *Refusal) Error() string { return "overloaded" }
func (r *Refusal) Unwrap() error { return ErrOverloaded }

// Config sizes a gate.
type Config struct {
	Slots int           // executions at once
	Wait  time.Duration // the longest a request waits for a slot
	// Turn is the longest one execution can hold its slot (the wall-clock limit plus start-up). It is the first
	// estimate of a turn, before any execution was measured, and the unit of Retry-After's upper bound.
	Turn time.Duration
	// MinTurn is the shortest turn the queue is sized for: the queue holds at most Slots*Wait/MinTurn requests,
	// which all could be served within the wait only if each took MinTurn.
	MinTurn time.Duration
}

// Gate admits at most Slots executions at once and queues the rest while they are likely to be served in time.
type Gate struct {
	cfg      Config
	maxQueue int

	now func() time.Time // time.Now; tests move it by hand

	mu      sync.Mutex
	running int
	queue   list.List     // of *waiter, oldest first
	turn    time.Duration // moving average of how long an execution held its slot
}

type waiter struct {
	ready    chan error // nil: the slot is the waiter's; else the refusal
	deadline time.Time
	elem     *list.Element
}

// New returns a gate. Zero values get defaults: one slot, a wait of three turns, a turn of 4 s, a minimum turn
// of 100 ms.
func New(cfg Config) *Gate {
	if cfg.Slots < 1 {
		cfg.Slots = 1
	}
	if cfg.Turn <= 0 {
		cfg.Turn = 4 * time.Second
	}
	if cfg.Wait <= 0 {
		cfg.Wait = 3 * cfg.Turn
	}
	if cfg.MinTurn <= 0 {
		cfg.MinTurn = 100 * time.Millisecond
	}
	g := &Gate{cfg: cfg, maxQueue: max(1, int(int64(cfg.Slots)*int64(cfg.Wait)/int64(cfg.MinTurn))), now: time.Now}
	// Before anything was measured, assume a turn is an eighth of the longest: most scripts end long before the
	// wall-clock limit. The estimate follows what executions really take within a few of them.
	g.turn = cfg.Turn / 8
	return g
}

// Slots is the number of executions that may run at once.
func (g *Gate) Slots() int { return g.cfg.Slots }

// MaxQueue is the longest the queue may grow.
func (g *Gate) MaxQueue() int { return g.maxQueue }

// Wait is the longest a request waits for a slot.
func (g *Gate) Wait() time.Duration { return g.cfg.Wait }

// InUse reports how many requests hold a slot or wait for one.
func (g *Gate) InUse() (running, waiting int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.running, g.queue.Len()
}

// Acquire waits for a slot. It returns a *Refusal (wrapping ErrOverloaded) when the request is unlikely to be
// served within the wait or was not, and ctx's error when ctx ends first (a client that went away leaves the
// queue). On success the caller must call release exactly once, when the execution is over.
func (g *Gate) Acquire(ctx context.Context) (release func(), err error) {
	g.mu.Lock()
	if g.running < g.cfg.Slots && g.queue.Len() == 0 {
		g.running++
		g.mu.Unlock()
		return g.releaser(), nil
	}
	ahead := g.queue.Len()
	if ahead >= g.admissible() {
		refusal := g.refusal(ahead)
		g.mu.Unlock()
		return nil, refusal
	}
	w := &waiter{ready: make(chan error, 1), deadline: g.now().Add(g.cfg.Wait)}
	w.elem = g.queue.PushBack(w)
	g.mu.Unlock()

	timer := time.NewTimer(g.cfg.Wait)
	defer timer.Stop()
	select {
	case err := <-w.ready:
		if err != nil {
			return nil, err
		}
		return g.releaser(), nil
	case <-timer.C:
		err = g.refusal(0)
	case <-ctx.Done():
		err = ctx.Err()
	}
	g.mu.Lock()
	if w.elem != nil { // still queued: leave
		g.queue.Remove(w.elem)
		w.elem = nil
		g.mu.Unlock()
		return nil, err
	}
	g.mu.Unlock()
	// Handed a slot (or refused) just as the wait ended: honour the hand-over's outcome.
	if herr := <-w.ready; herr != nil {
		return nil, herr
	}
	if ctx.Err() != nil {
		g.releaser()()
		return nil, ctx.Err()
	}
	return g.releaser(), nil
}

// predict is the expected wait of a request with ahead requests before it in the queue: the (ahead+1)-th slot to
// come free, with every slot freeing up once per turn.
func (g *Gate) predict(ahead int) time.Duration {
	return time.Duration(int64(ahead+1) * int64(g.turn) / int64(g.cfg.Slots))
}

// admissible is how long the queue may be for a new request to join it: as many as are likely to get a slot
// within three quarters of the wait (a quarter is headroom: the prediction follows past turns, and the next ones
// vary), and never more than the queue's bound. Called with g.mu held.
func (g *Gate) admissible() int {
	return min(int(int64(g.cfg.Wait)*3/4*int64(g.cfg.Slots)/int64(max(g.turn, time.Microsecond))), g.maxQueue)
}

// refusal says when a retry is likely to be admitted: once the queue has shrunk to what admissible allows.
// Called with g.mu held.
func (g *Gate) refusal(ahead int) *Refusal {
	excess := max(ahead+1-g.admissible(), 1)
	after := time.Duration(int64(excess) * int64(g.turn) / int64(g.cfg.Slots))
	return &Refusal{RetryAfter: max(min(after, g.cfg.Wait+g.cfg.Turn), time.Second)}
}

func (g *Gate) releaser() func() {
	start := g.now()
	var once sync.Once
	return func() { once.Do(func() { g.release(g.now().Sub(start)) }) }
}

// release hands the slot to the oldest waiter, learns from the turn that ended, and refuses at once the waiters at
// the tail that can no longer get a slot before their deadline.
func (g *Gate) release(held time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	const weight = 0.25 // of the newest turn in the moving average: a few turns are enough to follow a change
	g.turn = time.Duration(math.Round((1-weight)*float64(g.turn) + weight*float64(held)))
	if e := g.queue.Front(); e != nil {
		w := g.queue.Remove(e).(*waiter)
		w.elem = nil
		w.ready <- nil // the slot passes on: running stays the same
	} else {
		g.running--
	}
	now := g.now()
	for e := g.queue.Back(); e != nil; e = g.queue.Back() {
		w := e.Value.(*waiter)
		if !now.Add(g.predict(g.queue.Len() - 1)).After(w.deadline) {
			break
		}
		g.queue.Remove(e)
		w.elem = nil
		w.ready <- g.refusal(g.queue.Len())
	}
}
