// Package connlimit caps the connections an http.Server holds open, without letting idle or slow clients lock
// out new ones.
//
// A plain cap (netutil.LimitListener) stops accepting at the cap: forty clients that each keep an idle
// keep-alive connection, or that send half a request header and stop, make every new client, health checks
// included, wait in the kernel's backlog until a timeout frees a place. Here a new connection at the cap instead
// closes the oldest connection that is not serving a request (idle between requests, or still sending its
// header), so a client with a real request gets in at once. Only when every connection is inside a handler is
// the new one closed at once: a fast refusal rather than a hang.
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
	c    net.Conn
	busy int // requests inside the handler
	elem *list.Element
}

// New returns a Limiter that keeps at most max connections open.
func New(max int) *Limiter {
	return &Limiter{max: max, conns: map[net.Conn]*conn{}}
}

// Counts reports how many connections are open, how many were closed to make room, and how many new ones were
// refused because every connection was serving a request.
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
		for e := l.order.Front(); e != nil; e = e.Next() {
			if v := e.Value.(*conn); v.busy == 0 {
				victim = v.c
				l.removeLocked(v)
				l.evicted++
				break
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

// ConnContext is the server's ConnContext hook: it lets Handler find the request's connection.
func (l *Limiter) ConnContext(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, ctxKey{}, c)
}

// Handler marks a connection busy while h serves a request on it, so that it is never closed to make room.
func (l *Limiter) Handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, _ := r.Context().Value(ctxKey{}).(net.Conn)
		l.mark(c, +1)
		defer l.mark(c, -1)
		h.ServeHTTP(w, r)
	})
}

func (l *Limiter) mark(c net.Conn, delta int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	cc := l.conns[c]
	if cc == nil {
		return
	}
	cc.busy += delta
	if cc.busy == 0 && cc.elem != nil { // just finished a request: the most recently active
		l.order.MoveToBack(cc.elem)
	}
}
