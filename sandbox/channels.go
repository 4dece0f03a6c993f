package sandbox

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"sync"
	"syscall"
	"time"
)

// capture reads a stream the jail writes (stdout, stderr, nsjail's log) to its end, keeping the first max bytes
// and discarding the rest, so the writer never blocks on a full pipe whatever it writes.
type capture struct {
	max       int
	mu        sync.Mutex
	data      []byte
	truncated bool
}

func (c *capture) add(p []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if room := c.max - len(c.data); room < len(p) {
		c.truncated = true
		p = p[:max(room, 0)]
	}
	c.data = append(c.data, p...)
}

func (c *capture) get() ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.data, c.truncated
}

// drain reads r to its end (or its first error) into c.
func (c *capture) drain(r io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		c.add(buf[:n])
		if err != nil {
			return
		}
	}
}

// stream is a pipe from the jail, captured by a goroutine of its own.
type stream struct {
	capture
	f    *os.File
	done chan struct{}
}

func captureAsync(f *os.File, max int) *stream {
	s := &stream{capture: capture{max: max}, f: f, done: make(chan struct{})}
	go func() {
		s.drain(f)
		close(s.done)
	}()
	return s
}

// wait waits for the stream's end: every writer closed it.
func (s *stream) wait() ([]byte, bool) {
	<-s.done
	return s.get()
}

// now returns what the pipe holds now, without waiting for its end. Everything written to the pipe before the
// call is in it: what the reader took already, and what is still buffered, which is read here.
func (s *stream) now() ([]byte, bool) {
	if err := s.f.SetReadDeadline(time.Now()); err != nil { // stops the reader once it finds the pipe empty
		s.f.Close() // not pollable (never expected for os.Pipe): stop the reader the blunt way
	}
	<-s.done
	// The goroutine may have been woken by the deadline with bytes still buffered: read those directly.
	_ = s.f.SetReadDeadline(time.Time{})
	if rc, err := s.f.SyscallConn(); err == nil {
		buf := make([]byte, 32<<10)
		_ = rc.Read(func(fd uintptr) bool {
			for {
				n, err := syscall.Read(int(fd), buf)
				if n > 0 {
					s.add(buf[:n])
					continue
				}
				if errors.Is(err, syscall.EINTR) {
					continue
				}
				return true // empty (EAGAIN), closed, or failed: done either way
			}
		})
	}
	return s.get()
}

// resultRead is what arrived on the result channel: the start byte, then at most one files frame (kind 'F'), then
// one result frame; a frame is its kind byte, the payload's length (8 bytes, big-endian) and the payload.
type resultRead struct {
	started   bool
	frame     []byte // the result frame's kind byte and as much of its payload as was read
	complete  bool   // the whole result frame arrived, or its header said it is over the cap
	truncated bool   // the header said the payload is longer than the cap; it was not read
	files     []byte // the files frame's payload, if one came whole
}

// ResultKind reads a jail's result channel as Run does, up to its result frame, and returns the frame's kind: 'R'
// for main()'s value, 'E' for an error. For measuring the floor under the service (cmd/bench), with ColdCommand.
func ResultKind(r io.Reader) (byte, error) {
	res := readResult(r, make(chan struct{}), 1<<30)
	if !res.started || !res.complete || len(res.frame) == 0 {
		return 0, errors.New("the jail sent no complete result frame")
	}
	return res.frame[0], nil
}

// readResultAsync reads the result channel: the start byte (closing started when it arrives), then one frame.
// It stops reading after the frame, so what a script writes after it is never read.
func readResultAsync(r io.Reader, started chan<- struct{}, max int) <-chan resultRead {
	ch := make(chan resultRead, 1)
	go func() { ch <- readResult(r, started, max) }()
	return ch
}

func readResult(r io.Reader, started chan<- struct{}, max int) resultRead {
	var res resultRead
	first := make([]byte, 1)
	if n, _ := io.ReadFull(r, first); n != 1 || first[0] != 'S' {
		return res
	}
	res.started = true
	close(started)
	for frames := 0; ; frames++ {
		header := make([]byte, 9)
		n, _ := io.ReadFull(r, header)
		res.frame = header[:min(n, 1)]
		if n < len(header) {
			return res
		}
		size := binary.BigEndian.Uint64(header[1:])
		if header[0] == 'F' && frames == 0 {
			if size > maxFilesFrame { // the harness never sends one: the script forged it
				res.complete, res.truncated = true, true
				return res
			}
			payload := make([]byte, size)
			if n, _ := io.ReadFull(r, payload); n != len(payload) {
				return res
			}
			res.files = payload
			continue
		}
		if size > uint64(max) {
			res.complete, res.truncated = true, true
			return res
		}
		payload := make([]byte, size)
		n, _ = io.ReadFull(r, payload)
		res.frame = append(res.frame, payload[:n]...)
		res.complete = n == len(payload)
		return res
	}
}
