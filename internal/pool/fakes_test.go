package pool

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// fakeClock moves only when a test moves it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []fakeTimer
	seq    int // how many timers were set
}

type fakeTimer struct {
	at  time.Time
	c   chan time.Time
	seq int
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.seq++
	c.timers = append(c.timers, fakeTimer{c.now.Add(d), ch, c.seq})
	return ch
}

// advance moves the clock on and fires the timers that are due.
func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	var left []fakeTimer
	for _, t := range c.timers {
		if t.at.After(c.now) {
			left = append(left, t)
		} else {
			t.c <- c.now
		}
	}
	c.timers = left
}

// mark is how many timers were set so far: timerAt then looks only at timers set later.
func (c *fakeClock) mark() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seq
}

// timerAt reports whether someone set a timer after mark that waits for the clock to reach now+d.
func (c *fakeClock) timerAt(mark int, d time.Duration) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, t := range c.timers {
		if t.seq > mark && t.at.Equal(c.now.Add(d)) {
			return true
		}
	}
	return false
}

// fakeJail comes up at once, or when the test lets it (jails.hold).
type fakeJail struct {
	id       int
	prefault bool
	forked   bool
	clock    *fakeClock
	began    time.Time
	up       chan error // nil: comes up at once
	cameUp   func()     // called once AwaitReady returns

	mu        sync.Mutex
	readyAt   time.Time
	dead      bool
	discarded bool
}

func (j *fakeJail) AwaitReady(ctx context.Context) error {
	if j.cameUp != nil {
		defer j.cameUp()
	}
	var err error
	if j.up != nil {
		select {
		case err = <-j.up:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err != nil {
		j.dead, j.discarded = true, true
		return err
	}
	j.readyAt = j.clock.Now()
	return nil
}

func (j *fakeJail) Alive() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return !j.dead
}

func (j *fakeJail) Began() time.Time { return j.began }

func (j *fakeJail) ReadyAt() time.Time {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.readyAt
}

func (j *fakeJail) Discard() {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.dead, j.discarded = true, true
}

func (j *fakeJail) wasDiscarded() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.discarded
}

// age makes the jail d older.
func (j *fakeJail) age(d time.Duration) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.readyAt = j.readyAt.Add(-d)
}

func (j *fakeJail) kill() {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.dead = true
}

var errFake = errors.New("the fake start failed")

// jails makes fake jails for a pool and records every start.
type jails struct {
	clock *fakeClock

	mu        sync.Mutex
	noFork    bool          // Fork fails: the pool goes cold
	failStart bool          // Start fails
	failReady bool          // forked jails do not come up
	hold      bool          // jails wait for come() before they are ready
	startup   time.Duration // what a jail reports it took to come up
	made      []*fakeJail
	tries     []time.Time // when Fork (of a pool that forks) or Start was called
	active    int         // cold jails coming up
	maxActive int         // the most at once
}

func (f *jails) newJail(forked, prefault bool) *fakeJail {
	j := &fakeJail{id: len(f.made), forked: forked, prefault: prefault, clock: f.clock, began: f.clock.Now().Add(-f.startup)}
	if f.hold || forked && f.failReady {
		j.up = make(chan error, 1)
		if f.failReady {
			j.up <- errFake
		}
	}
	f.made = append(f.made, j)
	return j
}

func (f *jails) fork(prefault bool) (*fakeJail, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.noFork {
		return nil, errFake
	}
	f.tries = append(f.tries, f.clock.Now())
	return f.newJail(true, prefault), nil
}

func (f *jails) start() (*fakeJail, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tries = append(f.tries, f.clock.Now())
	if f.failStart {
		return nil, errFake
	}
	f.active++
	f.maxActive = max(f.maxActive, f.active)
	j := f.newJail(false, true)
	j.cameUp = func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.active--
	}
	return j, nil
}

func (f *jails) set(change func(f *jails)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	change(f)
}

func (f *jails) all() []*fakeJail {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*fakeJail{}, f.made...)
}

func (f *jails) starts() int { return len(f.all()) }

func (f *jails) attempts() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time{}, f.tries...)
}

// come lets the held jails come up (or fail, with err).
func (f *jails) come(err error) {
	for _, j := range f.all() {
		if j.up != nil {
			select {
			case j.up <- err:
			default:
			}
		}
	}
}

type setup struct {
	size   int
	maxAge time.Duration
	busy   func() bool
	turn   chan struct{}
}

func newTestPool(t *testing.T, s setup, f *jails) *Pool[*fakeJail] {
	t.Helper()
	if f.clock == nil {
		f.clock = newFakeClock()
	}
	if s.maxAge == 0 {
		s.maxAge = time.Hour
	}
	p := New(Config[*fakeJail]{Size: s.size, MaxAge: s.maxAge, Fork: f.fork, Start: f.start, Busy: s.busy,
		Turn: s.turn, Clock: f.clock})
	t.Cleanup(p.Close)
	return p
}

// eventually waits, in real time, for what the pool's goroutines do at once: it fails the test only if they are
// stuck.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !cond(); time.Sleep(50 * time.Microsecond) {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
	}
}

// advanceUntil moves the clock on by step at a time until cond holds, giving the pool's goroutines a moment to
// act on each step.
func advanceUntil(t *testing.T, f *jails, step time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		f.clock.advance(step)
		for settle := time.Now().Add(2 * time.Millisecond); !cond() && time.Now().Before(settle); {
			time.Sleep(50 * time.Microsecond)
		}
	}
}

// idle waits until the refill loop, since mark, went to sleep until now+d: it has done all it would before then.
func idle(t *testing.T, f *jails, mark int, d time.Duration) {
	t.Helper()
	eventually(t, "the refill to sleep "+d.String(), func() bool { return f.clock.timerAt(mark, d) })
}
