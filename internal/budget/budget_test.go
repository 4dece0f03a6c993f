package budget

import (
	"context"
	"errors"
	"testing"
	"time"
)

func left(b *Budget) [2]int64 { s, r := b.Left(); return [2]int64{s, r} }

func TestHold(t *testing.T) {
	b := New(100, 10, 3) // 100 shared, and 10 of the reserve for each of three holds
	h := b.NewHold()
	if !h.TryGrow(30) || !h.TryGrow(30) || h.TryGrow(51) || h.Bytes() != 60 || left(b) != [2]int64{50, 20} {
		t.Fatalf("grow: hold %d, left %v", h.Bytes(), left(b))
	}
	if err := h.Resize(context.Background(), 5); err != nil || h.Bytes() != 5 || left(b) != [2]int64{100, 25} {
		t.Fatalf("shrink by resize: hold %d, left %v", h.Bytes(), left(b))
	}
	if err := h.Resize(context.Background(), 110); err != nil || h.Bytes() != 110 || left(b) != [2]int64{0, 20} {
		t.Fatalf("grow by resize: %v, hold %d, left %v", err, h.Bytes(), left(b))
	}
	if err := h.Resize(context.Background(), 111); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("more than the whole budget: %v", err)
	}
	h.Shrink(105) // the shared part goes first: the hold keeps its reserve
	if h.Bytes() != 5 || left(b) != [2]int64{100, 25} {
		t.Fatalf("shrink: hold %d, left %v", h.Bytes(), left(b))
	}
	h.Release()
	h.Release()
	if h.Bytes() != 0 || left(b) != [2]int64{100, 30} || b.Size() != 130 {
		t.Fatalf("release: hold %d, left %v", h.Bytes(), left(b))
	}
}

// Holds that take all of the shared part leave every other hold its share of the reserve: a small request is
// never locked out by large ones.
func TestTheReserveIsKeptForSmallHolds(t *testing.T) {
	b := New(100, 10, 4)
	big1, big2 := b.NewHold(), b.NewHold()
	if !big1.TryGrow(60) || !big2.TryGrow(60) || big2.TryGrow(1) {
		t.Fatalf("the large holds: left %v", left(b))
	}
	small := b.NewHold()
	if !small.TryGrow(10) || small.TryGrow(1) {
		t.Fatalf("a small hold beside them: %d, left %v", small.Bytes(), left(b))
	}
}

// A hold waits for bytes given back, and stops waiting when its context ends; what it did not get stays free.
func TestResizeWaits(t *testing.T) {
	b := New(100, 0, 0)
	full := b.NewHold()
	full.TryGrow(100)
	h := b.NewHold()
	got := make(chan error, 1)
	go func() { got <- h.Resize(context.Background(), 30) }()
	select {
	case err := <-got:
		t.Fatalf("took from an empty budget: %v", err)
	case <-time.After(10 * time.Millisecond):
	}
	full.Shrink(20)
	select {
	case err := <-got:
		t.Fatalf("took 30 of 20: %v", err)
	case <-time.After(10 * time.Millisecond):
	}
	full.Shrink(10)
	if err := <-got; err != nil || left(b) != [2]int64{0, 0} {
		t.Fatalf("%v, left %v", err, left(b))
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.NewHold().Resize(ctx, 1); !errors.Is(err, context.Canceled) || left(b) != [2]int64{0, 0} {
		t.Fatalf("cancelled: %v, left %v", err, left(b))
	}
}
