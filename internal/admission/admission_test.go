package admission

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// fakeClock lets a test say how long each execution held its slot.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

func newGate(t *testing.T, cfg Config) (*Gate, *fakeClock) {
	t.Helper()
	g := New(cfg)
	c := &fakeClock{t: time.Unix(1e9, 0)}
	g.now = c.now
	return g, c
}

// learn teaches the gate that executions hold their slot for d.
func learn(t *testing.T, g *Gate, c *fakeClock, d time.Duration) {
	t.Helper()
	for i := 0; i < 40; i++ {
		release, err := g.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		c.add(d)
		release()
	}
}

// enqueue starts an Acquire in the background and waits until it is queued.
func enqueue(t *testing.T, g *Gate) <-chan error {
	t.Helper()
	_, before := g.InUse()
	got := make(chan error, 1)
	go func() {
		release, err := g.Acquire(context.Background())
		if err == nil {
			release()
		}
		got <- err
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, waiting := g.InUse(); waiting == before+1 {
			return got
		}
		select {
		case err := <-got:
			t.Fatalf("not queued: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("never queued")
		}
	}
}

func TestFirstComeFirstServed(t *testing.T) {
	g, _ := newGate(t, Config{Slots: 1, Wait: time.Hour})
	release, _ := g.Acquire(context.Background())
	var order []int
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := 0; i < 5; i++ {
		_, before := g.InUse()
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := g.Acquire(context.Background())
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
			r()
		}(i)
		for _, waiting := g.InUse(); waiting != before+1; _, waiting = g.InUse() {
			time.Sleep(time.Millisecond)
		}
	}
	release()
	wg.Wait()
	for i, v := range order {
		if v != i {
			t.Fatalf("served in order %v", order)
		}
	}
	if running, waiting := g.InUse(); running != 0 || waiting != 0 {
		t.Fatalf("after all: %d running, %d waiting", running, waiting)
	}
}

// A request that cannot be served within the wait is refused at once, with a Retry-After that says when the
// queue will have room again; the ones that can be served are queued.
func TestRefusedAtOnceWhenTheWaitCannotHoldIt(t *testing.T) {
	g, c := newGate(t, Config{Slots: 2, Wait: 10 * time.Second})
	learn(t, g, c, 2*time.Second) // turns of 2 s on 2 slots: a slot frees up every second
	hold1, _ := g.Acquire(context.Background())
	hold2, _ := g.Acquire(context.Background())
	var queued []<-chan error
	for i := 0; i < 7; i++ { // the 7th waits for the 7th slot to free up: 7 s, within three quarters of the wait
		queued = append(queued, enqueue(t, g))
	}
	begin := time.Now()
	_, err := g.Acquire(context.Background())
	var refusal *Refusal
	if !errors.As(err, &refusal) || !errors.Is(err, ErrOverloaded) {
		t.Fatalf("8th: got %v", err)
	}
	if waited := time.Since(begin); waited > time.Second {
		t.Fatalf("the refusal took %s", waited)
	}
	if refusal.RetryAfter < time.Second || refusal.RetryAfter > 2*time.Second {
		t.Fatalf("Retry-After %s, want about when one place frees up (1 s)", refusal.RetryAfter)
	}
	c.add(time.Second)
	hold1()
	c.add(time.Second)
	hold2()
	for i, q := range queued {
		if err := <-q; err != nil {
			t.Fatalf("queued request %d: %v", i, err)
		}
	}
}

// When executions turn out slower than predicted, the tail of the queue is refused as soon as the gate can see it
// would not be served in time, not when its wait runs out.
func TestTailRefusedAsSoonAsItCannotMakeIt(t *testing.T) {
	g, c := newGate(t, Config{Slots: 1, Wait: 10 * time.Second})
	learn(t, g, c, 100*time.Millisecond)
	hold, _ := g.Acquire(context.Background())
	var queued []<-chan error
	for i := 0; i < 8; i++ {
		queued = append(queued, enqueue(t, g))
	}
	c.add(9 * time.Second) // the running execution took 9 s: turns are long now, and little wait is left
	hold()
	refused := 0
	for _, q := range queued {
		select {
		case err := <-q:
			if errors.Is(err, ErrOverloaded) {
				refused++
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a queued request neither ran nor was refused")
		}
	}
	if refused == 0 || refused == len(queued) {
		t.Fatalf("%d of %d refused; want the tail refused and the head served", refused, len(queued))
	}
}

func TestQueueIsBounded(t *testing.T) {
	g, _ := newGate(t, Config{Slots: 1, Wait: time.Hour, MinTurn: 30 * time.Minute}) // room for 2
	if g.MaxQueue() != 2 {
		t.Fatalf("max queue %d", g.MaxQueue())
	}
	release, _ := g.Acquire(context.Background())
	defer release()
	enqueue(t, g)
	enqueue(t, g)
	if _, err := g.Acquire(context.Background()); !errors.Is(err, ErrOverloaded) {
		t.Fatalf("got %v", err)
	}
}

func TestWaitRunsOut(t *testing.T) {
	g := New(Config{Slots: 1, Wait: 20 * time.Millisecond, Turn: time.Millisecond})
	release, _ := g.Acquire(context.Background())
	defer release()
	var refusal *Refusal
	if _, err := g.Acquire(context.Background()); !errors.As(err, &refusal) || refusal.RetryAfter < time.Second {
		t.Fatalf("got %v", err)
	}
	if _, waiting := g.InUse(); waiting != 0 {
		t.Fatalf("a timed-out request still counts as waiting")
	}
}

func TestCancelledWhileQueued(t *testing.T) {
	g := New(Config{Slots: 1, Wait: time.Hour})
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

func TestDefaults(t *testing.T) {
	g := New(Config{Slots: 2, Turn: 4 * time.Second})
	if g.Wait() != 12*time.Second || g.Wait() <= 4*time.Second {
		t.Fatalf("default wait %s: it must outlast a full turn", g.Wait())
	}
	if g.MaxQueue() != 2*120 {
		t.Fatalf("max queue %d", g.MaxQueue())
	}
}
