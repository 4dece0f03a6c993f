// Package admission bounds how many executions run at once and how many may wait for a turn, and for how long.
// Past those bounds a request is refused at once, so an overloaded server sheds work instead of piling it up.
package admission

import (
	"context"
	"errors"
	"time"
)

// ErrOverloaded is returned when every slot is busy and the queue is full, or the wait for a slot ran out.
var ErrOverloaded = errors.New("overloaded")

// Gate admits at most Slots executions at once and lets at most Queue more wait, each for at most Wait.
type Gate struct {
	slots   chan struct{} // a token per running execution
	waiting chan struct{} // a token per admitted request, running or waiting
	wait    time.Duration
}

// New returns a gate with the given number of slots, queue length and longest wait.
func New(slots, queue int, wait time.Duration) *Gate {
	if slots < 1 {
		slots = 1
	}
	if queue < 0 {
		queue = 0
	}
	return &Gate{slots: make(chan struct{}, slots), waiting: make(chan struct{}, slots+queue), wait: wait}
}

// Slots is the number of executions that may run at once.
func (g *Gate) Slots() int { return cap(g.slots) }

// RetryAfter is a hint for a refused client: one longest wait, in whole seconds, at least one.
func (g *Gate) RetryAfter() int {
	s := int((g.wait + time.Second - 1) / time.Second)
	if s < 1 {
		s = 1
	}
	return s
}

// Acquire waits for a slot. It returns ErrOverloaded when the queue is full or the wait ran out, and ctx's error
// when ctx ends first (a client that went away leaves the queue). The caller must call release exactly once.
func (g *Gate) Acquire(ctx context.Context) (release func(), err error) {
	select {
	case g.waiting <- struct{}{}:
	default:
		return nil, ErrOverloaded
	}
	// Fast path: a free slot needs no timer.
	select {
	case g.slots <- struct{}{}:
		return g.release, nil
	default:
	}
	timer := time.NewTimer(g.wait)
	defer timer.Stop()
	select {
	case g.slots <- struct{}{}:
		return g.release, nil
	case <-timer.C:
		<-g.waiting
		return nil, ErrOverloaded
	case <-ctx.Done():
		<-g.waiting
		return nil, ctx.Err()
	}
}

func (g *Gate) release() {
	<-g.slots
	<-g.waiting
}

// InUse reports how many requests hold a slot or wait for one.
func (g *Gate) InUse() (running, waiting int) {
	r := len(g.slots)
	return r, len(g.waiting) - r
}
