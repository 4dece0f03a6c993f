// Package budget bounds the bytes a server holds in memory for its clients at once: request bodies as they arrive
// and answers until they are written. Holders take bytes and give them back; a holder that cannot have what it
// needs waits (within its context) or is refused, and the server's memory stays within the budget whatever its
// clients do.
package budget

import (
	"context"
	"errors"
	"sync"
)

// ErrTooLarge is returned by Take for a request larger than the whole budget: no wait would help.
var ErrTooLarge = errors.New("more than the whole budget")

// Budget is a number of bytes that holders take and give back. It is safe for concurrent use.
type Budget struct {
	size int64

	mu    sync.Mutex
	left  int64
	freed chan struct{} // closed, and replaced, whenever bytes are given back: waiters look again
}

// New returns a budget of size bytes.
func New(size int64) *Budget { return &Budget{size: size, left: size, freed: make(chan struct{})} }

// Size is the whole budget.
func (b *Budget) Size() int64 { return b.size }

// Left is what is not taken now.
func (b *Budget) Left() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.left
}

// TryTake takes n bytes if they are free now, and reports whether it did.
func (b *Budget) TryTake(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if n > b.left {
		return false
	}
	b.left -= n
	return true
}

// Take takes n bytes, waiting until they are free or ctx ends (ctx's error). A request larger than the whole budget
// is refused at once with ErrTooLarge.
func (b *Budget) Take(ctx context.Context, n int64) error {
	if n > b.size {
		return ErrTooLarge
	}
	for {
		b.mu.Lock()
		if n <= b.left {
			b.left -= n
			b.mu.Unlock()
			return nil
		}
		freed := b.freed
		b.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Give gives back n bytes taken before.
func (b *Budget) Give(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.left += n
	close(b.freed)
	b.freed = make(chan struct{})
	b.mu.Unlock()
}

// Hold is what one holder has of a budget: it grows and shrinks to what the holder needs, and is given back in one
// call when the holder is done. Not safe for concurrent use: one holder, one goroutine.
type Hold struct {
	b *Budget
	n int64
}

// NewHold returns an empty hold on b.
func (b *Budget) NewHold() *Hold { return &Hold{b: b} }

// Bytes is what the hold has.
func (h *Hold) Bytes() int64 { return h.n }

// TryGrow takes n more bytes if they are free now.
func (h *Hold) TryGrow(n int64) bool {
	if !h.b.TryTake(n) {
		return false
	}
	h.n += n
	return true
}

// Resize makes the hold exactly n bytes: what it has beyond n is given back at once; what it lacks is waited
// for within ctx.
func (h *Hold) Resize(ctx context.Context, n int64) error {
	if n <= h.n {
		h.b.Give(h.n - n)
		h.n = n
		return nil
	}
	if err := h.b.Take(ctx, n-h.n); err != nil {
		return err
	}
	h.n = n
	return nil
}

// Shrink gives back n bytes of the hold (at most what it has).
func (h *Hold) Shrink(n int64) {
	n = min(n, h.n)
	h.b.Give(n)
	h.n -= n
}

// Release gives everything back.
func (h *Hold) Release() { h.Shrink(h.n) }
