package admission

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestGate(t *testing.T) {
	g := New(2, 1, time.Hour)
	r1, err1 := g.Acquire(context.Background())
	r2, err2 := g.Acquire(context.Background())
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}

	// The third waits in the queue; the fourth finds the queue full and is refused at once.
	got := make(chan error, 1)
	var r3 func()
	go func() {
		var err error
		r3, err = g.Acquire(context.Background())
		got <- err
	}()
	for {
		if _, waiting := g.InUse(); waiting == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := g.Acquire(context.Background()); !errors.Is(err, ErrOverloaded) {
		t.Fatalf("queue full: got %v", err)
	}
	r1()
	if err := <-got; err != nil {
		t.Fatalf("queued request: %v", err)
	}
	r2()
	r3()
	if running, waiting := g.InUse(); running != 0 || waiting != 0 {
		t.Fatalf("after release: %d running, %d waiting", running, waiting)
	}
}

func TestGateWaitRunsOut(t *testing.T) {
	g := New(1, 5, 10*time.Millisecond)
	release, _ := g.Acquire(context.Background())
	defer release()
	if _, err := g.Acquire(context.Background()); !errors.Is(err, ErrOverloaded) {
		t.Fatalf("got %v", err)
	}
	if _, waiting := g.InUse(); waiting != 0 {
		t.Fatalf("a timed-out request still counts as waiting")
	}
	if g.RetryAfter() != 1 {
		t.Fatalf("RetryAfter %d", g.RetryAfter())
	}
}

func TestGateCancelledWhileQueued(t *testing.T) {
	g := New(1, 5, time.Hour)
	release, _ := g.Acquire(context.Background())
	defer release()
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for {
			if _, waiting := g.InUse(); waiting == 1 {
				cancel()
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	if _, err := g.Acquire(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v", err)
	}
	if _, waiting := g.InUse(); waiting != 0 {
		t.Fatalf("a cancelled request still counts as waiting")
	}
}
