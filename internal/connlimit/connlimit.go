// Package connlimit caps the connections an http.Server holds open, without letting idle or slow clients lock
// out new ones.
//
// A plain cap (netutil.LimitListener) stops accepting at the cap: forty clients that each keep an idle
// keep-alive connection, or that send half a request header and stop, make every new client, health checks
// included, wait in the kernel's backlog until a timeout frees a place. Here a new connection at the cap instead
// closes the oldest connection that is not held: idle between requests, still sending its header or body, or being
// answered (a client that does not read its answer waits on nobody but itself). A handler holds its connection
// (Hold) only while the server itself is working for it, such as while its script waits for a slot or runs; only
// when every connection is held is the new one closed at once: a fast refusal rather than a hang.
package connlimit

import (
	"container/list"
	"context"
	"net"
	"net/http"
	"sync"
)

// Limiter tracks a server's connections. Wire it with Listener, ConnContext, ConnState and Handler.
type Limiter struct {
	max int

	mu    sync.Mutex
	conns map[net.Conn]*conn
	order list.List // of *conn, least recently active first
	// Evicted counts connections closed to make room, for the log and the tests.
	evicted, refused int
}

type conn struct {
	c      net.Conn
	held   int // holds of handlers working for the connection's requests: it is never closed to make room
	active int // requests inside the handler (receiving a body, waiting, being answered)
	elem   *list.Element
}

// New returns a Limiter that keeps at most max connections open.
func New(max int) *Limiter {
	return &Limiter{max: max, conns: map[net.Conn]*conn{}}
}

// Counts reports how many connections are open, how many were closed to make room, and how many new ones were
// refused because every connection was held.
func (l *Limiter) Counts() (open, evicted, refused int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns), l.evicted, l.refused
}

// Listener wraps ln so that every accepted connection is counted, making room at the cap.
func (l *Limiter) Listener(ln net.Listener) net.Listener { return &listener{Listener: ln, l: l} }

type listener struct {
	net.Listener
	l *Limiter
}

func (ln *listener) Accept() (net.Conn, error) {
	for {
		c, err := ln.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if ln.l.admit(c) {
			return c, nil
		}
		c.Close()
	}
}

func (l *Limiter) admit(c net.Conn) bool {
	l.mu.Lock()
	var victim net.Conn
	if len(l.conns) >= l.max {
		// The oldest idle one (or still sending its header) first; only if there is none, the oldest in the middle
		// of a request the server is not working for (a body on its way, an answer being read): clients that just
		// open connections make room among themselves, not at the cost of a transfer under way.
		for _, transfers := range []bool{false, true} {
			for e := l.order.Front(); e != nil && victim == nil; e = e.Next() {
				if v := e.Value.(*conn); v.held == 0 && (v.active == 0 || transfers) {
					victim = v.c
					l.removeLocked(v)
					l.evicted++
				}
			}
		}
		if victim == nil {
			l.refused++
			l.mu.Unlock()
			return false
		}
	}
	cc := &conn{c: c}
	cc.elem = l.order.PushBack(cc)
	l.conns[c] = cc
	l.mu.Unlock()
	if victim != nil {
		victim.Close() // its server goroutine sees the error and ends; ConnState(Closed) finds it gone already
	}
	return true
}

func (l *Limiter) removeLocked(cc *conn) {
	if cc.elem != nil {
		l.order.Remove(cc.elem)
		cc.elem = nil
	}
	delete(l.conns, cc.c)
}

// ConnState is the server's ConnState hook: it forgets connections that closed.
func (l *Limiter) ConnState(c net.Conn, state http.ConnState) {
	if state != http.StateClosed && state != http.StateHijacked {
		return
	}
	l.mu.Lock()
	if cc := l.conns[c]; cc != nil {
		l.removeLocked(cc)
	}
	l.mu.Unlock()
}

type ctxKey struct{}

type connRef struct {
	l *Limiter
	c net.Conn
}

// ConnContext is the server's ConnContext hook: it lets Handler and Hold find the request's connection.
func (l *Limiter) ConnContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, ctxKey{}, connRef{l, c})
}

// Handler counts the requests inside the handler: a connection in the middle of one is closed to make room only
// when no idle one is left, and one that just began a request is the last of those.
func (l *Limiter) Handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ref, ok := r.Context().Value(ctxKey{}).(connRef); ok {
			l.activate(ref.c, +1)
			defer l.activate(ref.c, -1)
		}
		h.ServeHTTP(w, r)
	})
}

// Hold keeps the connection of the request whose context ctx is from being closed to make room, until release is
// called: for while the server itself works for the request (its script waits for a slot or runs), not while it
// waits on the client (reading its body, writing an answer the client may not read). Outside a Limiter's server it
// does nothing.
func Hold(ctx context.Context) (release func()) {
	ref, ok := ctx.Value(ctxKey{}).(connRef)
	if !ok {
		return func() {}
	}
	ref.l.mark(ref.c, +1)
	var once sync.Once
	return func() { once.Do(func() { ref.l.mark(ref.c, -1) }) }
}

// activate changes how many requests a connection has inside the handler, and makes it the most recently active.
func (l *Limiter) activate(c net.Conn, delta int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if cc := l.conns[c]; cc != nil {
		cc.active += delta
		if cc.elem != nil {
			l.order.MoveToBack(cc.elem)
		}
	}
}

// mark changes a connection's holds by delta and makes it the most recently active.
func (l *Limiter) mark(c net.Conn, delta int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	cc := l.conns[c]
	if cc == nil {
		return
	}
	cc.held += delta
	if cc.elem != nil {
		l.order.MoveToBack(cc.elem)
	}
}
