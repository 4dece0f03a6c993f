package budget

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestTakeAndGive(t *testing.T) {
	b := New(100)
	if !b.TryTake(60) || b.TryTake(41) || !b.TryTake(40) || b.Left() != 0 {
		t.Fatalf("takes: left %d", b.Left())
	}
	b.Give(100)
	if b.Left() != 100 {
		t.Fatalf("left %d after giving all back", b.Left())
	}
	if err := b.Take(context.Background(), 101); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("more than the budget: %v", err)
	}
}

// A taker waits for bytes given back, and stops waiting when its context ends; the bytes it did not get stay free.
func TestTakeWaits(t *testing.T) {
	b := New(100)
	b.TryTake(100)
	got := make(chan error, 1)
	go func() { got <- b.Take(context.Background(), 30) }()
	select {
	case err := <-got:
		t.Fatalf("took from an empty budget: %v", err)
	case <-time.After(10 * time.Millisecond):
	}
	b.Give(20)
	select {
	case err := <-got:
		t.Fatalf("took 30 of 20: %v", err)
	case <-time.After(10 * time.Millisecond):
	}
	b.Give(10)
	if err := <-got; err != nil || b.Left() != 0 {
		t.Fatalf("%v, left %d", err, b.Left())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.Take(ctx, 1); !errors.Is(err, context.Canceled) || b.Left() != 0 {
		t.Fatalf("cancelled: %v, left %d", err, b.Left())
	}
}

func TestHold(t *testing.T) {
	b := New(100)
	h := b.NewHold()
	if !h.TryGrow(30) || !h.TryGrow(30) || h.TryGrow(41) || h.Bytes() != 60 || b.Left() != 40 {
		t.Fatalf("grow: hold %d, left %d", h.Bytes(), b.Left())
	}
	if err := h.Resize(context.Background(), 10); err != nil || h.Bytes() != 10 || b.Left() != 90 {
		t.Fatalf("shrink by resize: hold %d, left %d", h.Bytes(), b.Left())
	}
	if err := h.Resize(context.Background(), 100); err != nil || h.Bytes() != 100 || b.Left() != 0 {
		t.Fatalf("grow by resize: %v, hold %d, left %d", err, h.Bytes(), b.Left())
	}
	h.Shrink(25)
	if h.Bytes() != 75 || b.Left() != 25 {
		t.Fatalf("shrink: hold %d, left %d", h.Bytes(), b.Left())
	}
	h.Release()
	h.Release()
	if h.Bytes() != 0 || b.Left() != 100 {
		t.Fatalf("release: hold %d, left %d", h.Bytes(), b.Left())
	}
}
