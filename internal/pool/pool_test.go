package pool

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// The pool fills up to its size, with prefaulted jails when no request has come, forked or, without a fork
// server, cold; it starts none beyond its size.
func TestRefillsUpToSize(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int
		noFork bool
	}{{"forked", 3, false}, {"cold", 3, true}, {"off", 0, false}} {
		t.Run(tc.name, func(t *testing.T) {
			f := &jails{noFork: tc.noFork}
			p := newTestPool(t, setup{size: tc.size}, f)
			if tc.size == 0 {
				if _, ok := p.Take(); ok || f.starts() != 0 {
					t.Fatalf("a pool of size 0 gave a jail or started %d", f.starts())
				}
				return
			}
			eventually(t, "a full pool", func() bool { return p.Count() == tc.size })
			idle(t, f, 0, time.Hour/4) // at rest: it looks again when the oldest jail may have aged
			if n := f.starts(); n != tc.size {
				t.Fatalf("%d starts for a pool of %d", n, tc.size)
			}
			for _, j := range f.all() {
				if !j.prefault || j.forked == tc.noFork {
					t.Fatalf("jail %d: prefault=%v forked=%v", j.id, j.prefault, j.forked)
				}
			}
			if p.Settled() != tc.size {
				t.Fatalf("%d of %d settled", p.Settled(), tc.size)
			}
		})
	}
}

// A take wakes the refill. A request that came seldom leaves its answer refillDelay before the pool makes the next
// jail, if it still holds one; one that emptied the pool has it refilled at once.
func TestTakeWakesRefill(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     int
		waitsFor time.Duration
	}{{"seldom, a jail left", 2, refillDelay}, {"the pool emptied", 1, 0}} {
		t.Run(tc.name, func(t *testing.T) {
			f := &jails{}
			p := newTestPool(t, setup{size: tc.size}, f)
			eventually(t, "a full pool", func() bool { return p.Count() == tc.size })
			m := f.clock.mark()
			if _, ok := p.Take(); !ok {
				t.Fatal("no jail in a full pool")
			}
			if tc.waitsFor > 0 {
				idle(t, f, m, tc.waitsFor)
				if n := f.starts(); n != tc.size {
					t.Fatalf("the refill started a jail before the answer's time was up (%d starts)", n)
				}
				f.clock.advance(tc.waitsFor)
			}
			eventually(t, "the pool refilled", func() bool { return p.Count() == tc.size && f.starts() == tc.size+1 })
		})
	}
}

// Requests that come back to back take bare jails (a prefault would only delay the next one); once they stop,
// the bare jail is replaced by a prefaulted one, not before bareIdle.
func TestBareWhileBackToBackPrefaultedAtRest(t *testing.T) {
	f := &jails{}
	p := newTestPool(t, setup{size: 1}, f)
	eventually(t, "a full pool", func() bool { return p.Count() == 1 })
	p.Take() // the first in a long while: its replacement is prefaulted
	eventually(t, "the second jail", func() bool { return p.Count() == 1 })
	f.clock.advance(20 * time.Millisecond)
	m := f.clock.mark()
	p.Take() // back to back
	eventually(t, "the third jail", func() bool { return p.Count() == 1 && f.starts() == 3 })
	made := f.all()
	if !made[1].prefault || made[2].prefault {
		t.Fatalf("prefault: after a seldom request %v, after one back to back %v", made[1].prefault, made[2].prefault)
	}
	if s := p.State(); !s.Bare[0] || p.Settled() != 0 {
		t.Fatalf("a bare jail counts as settled: %+v", s)
	}
	idle(t, f, m, Seldom) // it will look again when the bare jail may be replaced
	f.clock.advance(Seldom - time.Millisecond)
	if made[2].wasDiscarded() || f.starts() != 3 {
		t.Fatal("the bare jail was replaced before requests stopped for bareIdle")
	}
	advanceUntil(t, f, 5*time.Millisecond, "a prefaulted jail at rest", func() bool {
		return made[2].wasDiscarded() && p.Settled() == 1
	})
	if j := f.all()[3]; !j.prefault {
		t.Fatal("the bare jail's replacement is bare")
	}
}

// Requests back to back still get prefaulted jails if they come far enough apart for one to be ready before a
// request takes it: the jail forked now is taken about size requests from now.
func TestPrefaultWhileRequestsLeaveTime(t *testing.T) {
	for _, tc := range []struct {
		name     string
		gap      time.Duration
		prefault bool
	}{{"2 × 60 ms apart, 40 ms to prefault", 60 * time.Millisecond, true}, {"2 × 20 ms apart, 40 ms to prefault", 20 * time.Millisecond, false}} {
		t.Run(tc.name, func(t *testing.T) {
			f := &jails{startup: 40 * time.Millisecond}
			p := newTestPool(t, setup{size: 2}, f)
			eventually(t, "a full pool", func() bool { return p.Count() == 2 })
			m := f.clock.mark()
			p.Take() // the first in a long while: it waits refillDelay, then its replacement is prefaulted
			idle(t, f, m, refillDelay)
			f.clock.advance(tc.gap)
			eventually(t, "the pool refilled", func() bool { return p.Count() == 2 && f.starts() == 3 })
			p.Take()
			eventually(t, "the pool refilled again", func() bool { return p.Count() == 2 && f.starts() == 4 })
			if j := f.all()[3]; j.prefault != tc.prefault {
				t.Fatalf("prefault=%v, want %v", j.prefault, tc.prefault)
			}
		})
	}
}

// A request that finds the pool empty waits for a jail the pool is forming, if no other request waits for it, and
// gives up after its bound or when its context ends; with nothing forming it does not wait at all.
func TestAwaitForming(t *testing.T) {
	for _, tc := range []struct {
		name    string
		forming bool
		second  bool // a second request comes while the first waits
		giveUp  func(f *jails, cancel context.CancelFunc)
		want    bool
	}{
		{name: "takes the forming jail", forming: true, want: true},
		{name: "a second waiter does not wait", forming: true, second: true, want: true},
		{name: "gives up after its bound", forming: true,
			giveUp: func(f *jails, _ context.CancelFunc) { f.clock.advance(50 * time.Millisecond) }},
		{name: "gives up when its context ends", forming: true, giveUp: func(_ *jails, cancel context.CancelFunc) { cancel() }},
		{name: "nothing forming"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &jails{}
			var busy atomic.Bool
			p := newTestPool(t, setup{size: 1, busy: busy.Load}, f)
			eventually(t, "a full pool", func() bool { return p.Count() == 1 })
			f.set(func(f *jails) { f.hold = true })
			if !tc.forming {
				busy.Store(true)
			}
			p.Take()
			if tc.forming {
				eventually(t, "a jail forming", func() bool { return p.State().Forming == 1 })
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			type got struct {
				j  *fakeJail
				ok bool
			}
			done := make(chan got, 1)
			go func() {
				j, ok := p.AwaitForming(ctx, 50*time.Millisecond)
				done <- got{j, ok}
			}()
			if !tc.forming {
				if g := <-done; g.ok {
					t.Fatal("a jail with none forming")
				}
				return
			}
			eventually(t, "the request waiting", func() bool { return p.State().Waiting == 1 })
			if tc.second {
				if _, ok := p.AwaitForming(ctx, time.Hour); ok {
					t.Fatal("the second request got a jail")
				}
				if w := p.State().Waiting; w != 1 {
					t.Fatalf("%d waiting after the second request left", w)
				}
			}
			if tc.giveUp != nil {
				tc.giveUp(f, cancel)
				if g := <-done; g.ok {
					t.Fatal("a jail after giving up")
				}
				if s := p.State(); s.Waiting != 0 || s.Forming != 1 {
					t.Fatalf("after giving up: %+v", s)
				}
				f.come(nil) // the jail still joins the pool
				eventually(t, "the forming jail in the pool", func() bool { return p.Count() == 1 })
				return
			}
			f.come(nil)
			g := <-done
			if !g.ok || g.j != f.all()[1] {
				t.Fatalf("got %+v, want the forming jail", g)
			}
			if w := p.State().Waiting; w != 0 {
				t.Fatalf("%d still waiting", w)
			}
		})
	}
}

// After a failed start the pool starts nothing for 100 ms, doubling with each failure in a row; a success resets
// the pause.
func TestBackoff(t *testing.T) {
	for _, tc := range []struct {
		name string
		fail func(f *jails, failing bool)
	}{
		{"forked jails do not come up", func(f *jails, failing bool) { f.failReady = failing }},
		{"cold starts fail", func(f *jails, failing bool) { f.noFork, f.failStart = true, failing }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &jails{}
			f.set(func(f *jails) { tc.fail(f, true) })
			p := newTestPool(t, setup{size: 1}, f)
			p.SetBareIdle(time.Hour) // its looks at bare jails would only add timers
			tries := func() int { return len(f.attempts()) }
			// pause checks that the pool, which has just failed a start, makes no other for want, and makes one then.
			pause := func(mark int, want time.Duration) {
				t.Helper()
				idle(t, f, mark, want)
				n := tries()
				f.clock.advance(want - time.Millisecond)
				if tries() != n {
					t.Fatalf("a start %s into a pause of %s", want-time.Millisecond, want)
				}
				advanceUntil(t, f, time.Millisecond, "the start after the pause", func() bool { return tries() == n+1 })
				if n == 4 {
					return // the start that succeeds
				}
				if at := f.attempts(); at[n].Sub(at[n-1]) > want+10*time.Millisecond {
					t.Fatalf("a pause of %s, want %s", at[n].Sub(at[n-1]), want)
				}
			}
			eventually(t, "a failed start", func() bool { return tries() == 1 })
			mark := 0
			for i, want := range []time.Duration{100, 200, 400, 800} {
				if i == 3 {
					f.set(func(f *jails) { tc.fail(f, false) })
				}
				m := f.clock.mark()
				pause(mark, want*time.Millisecond)
				mark = m
			}
			eventually(t, "a jail at last", func() bool { return p.Count() == 1 })
			f.set(func(f *jails) { tc.fail(f, true) })
			n := tries()
			mark = f.clock.mark()
			p.Take()
			eventually(t, "a failed start", func() bool { return tries() == n+1 })
			pause(mark, 100*time.Millisecond) // not 800 ms: the success reset it
		})
	}
}

// A jail older than maxAge, or dead, is retired without serving, whether a request or the refill finds it.
func TestRetiresOldAndDeadJails(t *testing.T) {
	for _, tc := range []struct {
		name   string
		retire func(t *testing.T, p *Pool[*fakeJail], f *jails, j *fakeJail)
	}{
		{"aged, found by the refill", func(t *testing.T, p *Pool[*fakeJail], f *jails, j *fakeJail) {
			advanceUntil(t, f, time.Second, "the aged jail retired", j.wasDiscarded)
		}},
		{"aged, found by a request", func(t *testing.T, p *Pool[*fakeJail], f *jails, j *fakeJail) {
			j.age(time.Second) // without moving the clock, which would wake the refill first
			if _, ok := p.Take(); ok {
				t.Fatal("a request took an aged jail")
			}
		}},
		{"dead, found by the refill", func(t *testing.T, p *Pool[*fakeJail], f *jails, j *fakeJail) { j.kill(); p.Poke() }},
		{"dead, found by a request", func(t *testing.T, p *Pool[*fakeJail], f *jails, j *fakeJail) {
			j.kill()
			if _, ok := p.Take(); ok {
				t.Fatal("a request took a dead jail")
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &jails{}
			p := newTestPool(t, setup{size: 1, maxAge: time.Second}, f)
			eventually(t, "a full pool", func() bool { return p.Count() == 1 })
			idle(t, f, 0, time.Second/4)
			first := f.all()[0]
			tc.retire(t, p, f, first)
			eventually(t, "a new jail", func() bool { return first.wasDiscarded() && p.Count() == 1 && f.starts() == 2 })
			if j, ok := p.Take(); !ok || j == first {
				t.Fatalf("took %v %v, want the new jail", j, ok)
			}
		})
	}
}

// While the service is busy the pool starts nothing; it fills once the load drops.
func TestBusyStopsRefilling(t *testing.T) {
	f := &jails{}
	var busy atomic.Bool
	busy.Store(true)
	p := newTestPool(t, setup{size: 2, busy: busy.Load}, f)
	idle(t, f, 0, 50*time.Millisecond) // it looks again soon
	if n := f.starts(); n != 0 {
		t.Fatalf("%d starts while busy", n)
	}
	f.clock.advance(time.Minute)
	if n := f.starts(); n != 0 {
		t.Fatalf("%d starts while busy", n)
	}
	busy.Store(false)
	p.Poke() // an execution ended
	eventually(t, "a full pool", func() bool { return p.Count() == 2 })
}

// Cold starts take turns between the pools that share the token.
func TestColdStartsTakeTurns(t *testing.T) {
	f := &jails{noFork: true, hold: true}
	f.clock = newFakeClock()
	turn := make(chan struct{}, 1)
	a := newTestPool(t, setup{size: 2, turn: turn}, f)
	b := newTestPool(t, setup{size: 2, turn: turn}, f)
	for n := 1; n <= 4; n++ {
		eventually(t, "the next cold start", func() bool { return f.starts() == n })
		time.Sleep(time.Millisecond) // a start out of turn would show now
		f.come(nil)
	}
	eventually(t, "both pools full", func() bool { return a.Count() == 2 && b.Count() == 2 })
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.maxActive != 1 {
		t.Fatalf("%d cold jails came up at once", f.maxActive)
	}
}

// Close stops the refill, abandons the starts under way and destroys every ready jail; nothing starts after it.
func TestClose(t *testing.T) {
	for _, tc := range []struct {
		name   string
		noFork bool
	}{{"forming forked", false}, {"starting cold", true}} {
		t.Run(tc.name, func(t *testing.T) {
			f := &jails{noFork: tc.noFork}
			p := newTestPool(t, setup{size: 2}, f)
			eventually(t, "a full pool", func() bool { return p.Count() == 2 })
			f.set(func(f *jails) { f.hold = true })
			m := f.clock.mark()
			taken, _ := p.Take()
			idle(t, f, m, refillDelay)
			f.clock.advance(refillDelay)
			eventually(t, "a jail under way", func() bool { return f.starts() == 3 })
			p.Close()
			for _, j := range f.all() {
				if j != taken && !j.wasDiscarded() {
					t.Fatalf("jail %d survived Close", j.id)
				}
			}
			n := f.starts()
			p.Poke()
			f.clock.advance(time.Hour)
			time.Sleep(time.Millisecond)
			if _, ok := p.Take(); ok || f.starts() != n {
				t.Fatalf("after Close: a take found a jail (%v), %d starts after %d", ok, f.starts(), n)
			}
			p.Close() // again: nothing to do
		})
	}
}
