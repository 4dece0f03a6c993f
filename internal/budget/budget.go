// Package budget bounds the bytes a server holds in memory for its clients at once: request bodies as they arrive
// and answers until they are written. Each client's request has a hold on the budget that grows and shrinks with
// what it needs; a hold that cannot have more waits (within its context) or is refused, and the server's memory
// stays within the budget whatever its clients do.
//
// The budget has two parts. A hold's first bytes (up to a small amount) come from a reserve sized for as many holds
// as can exist at once (one per connection), the rest from a shared part. So clients that take all of the shared
// part (with large answers they read as slowly as they may, say) leave every other request room for a small body
// and a small answer: the ordinary request, which one slow client cannot lock out.
package budget

import (
	"context"
	"errors"
	"sync"
)

// ErrTooLarge is returned by Resize for a hold larger than the whole budget: no wait would help.
var ErrTooLarge = errors.New("more than the whole budget")

// Budget is a number of bytes that holds take and give back. It is safe for concurrent use.
type Budget struct {
	shared, perHold, reserve int64

	mu                      sync.Mutex
	sharedLeft, reserveLeft int64
	freed                   chan struct{} // closed, and replaced, whenever bytes are given back: waiters look again
}

// New returns a budget of shared bytes, and a reserve of perHold bytes for each of holds holds at once.
func New(shared, perHold int64, holds int) *Budget {
	reserve := perHold * int64(holds)
	return &Budget{shared: shared, perHold: perHold, reserve: reserve, sharedLeft: shared, reserveLeft: reserve,
		freed: make(chan struct{})}
}

// Size is the whole budget, reserve included.
func (b *Budget) Size() int64 { return b.shared + b.reserve }

// Left is what is not taken now, of the shared part and of the reserve.
func (b *Budget) Left() (shared, reserve int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sharedLeft, b.reserveLeft
}

// Hold is what one holder has of a budget. Not safe for concurrent use: one holder, one goroutine.
type Hold struct {
	b                *Budget
	shared, reserved int64 // what it has of each part
}

// NewHold returns an empty hold.
func (b *Budget) NewHold() *Hold { return &Hold{b: b} }

// Bytes is what the hold has.
func (h *Hold) Bytes() int64 { return h.shared + h.reserved }

// tryLocked takes n more bytes if they are free: from the reserve up to the hold's share of it, the rest from the
// shared part. Called with b.mu held.
func (h *Hold) tryLocked(n int64) bool {
	b := h.b
	fromReserve := min(n, b.perHold-h.reserved, b.reserveLeft)
	if n-fromReserve > b.sharedLeft {
		return false
	}
	b.reserveLeft -= fromReserve
	b.sharedLeft -= n - fromReserve
	h.reserved += fromReserve
	h.shared += n - fromReserve
	return true
}

// TryGrow takes n more bytes if they are free now.
func (h *Hold) TryGrow(n int64) bool {
	h.b.mu.Lock()
	defer h.b.mu.Unlock()
	return h.tryLocked(n)
}

// Resize makes the hold exactly n bytes: what it has beyond n is given back at once; what it lacks is waited for
// within ctx (ctx's error if it ends first). A hold larger than the whole budget is refused at once (ErrTooLarge).
func (h *Hold) Resize(ctx context.Context, n int64) error {
	if n <= h.Bytes() {
		h.Shrink(h.Bytes() - n)
		return nil
	}
	if n-min(n, h.b.perHold) > h.b.shared {
		return ErrTooLarge
	}
	for {
		h.b.mu.Lock()
		if h.tryLocked(n - h.Bytes()) {
			h.b.mu.Unlock()
			return nil
		}
		freed := h.b.freed
		h.b.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Shrink gives back n bytes of the hold (at most what it has): of the shared part first, so that the hold keeps
// its share of the reserve as long as it holds anything.
func (h *Hold) Shrink(n int64) {
	n = min(n, h.Bytes())
	if n <= 0 {
		return
	}
	b := h.b
	b.mu.Lock()
	fromShared := min(n, h.shared)
	h.shared -= fromShared
	h.reserved -= n - fromShared
	b.sharedLeft += fromShared
	b.reserveLeft += n - fromShared
	close(b.freed)
	b.freed = make(chan struct{})
	b.mu.Unlock()
}

// Release gives everything back.
func (h *Hold) Release() { h.Shrink(h.Bytes()) }
