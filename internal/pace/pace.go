// Package pace holds a transfer to a minimum rate: a peer that sends a body, or reads an answer, slower than the
// rate (after a grace period for the start) is cut off, so that a stalled or trickling client holds neither the
// server's memory nor a connection for long. The deadline moves with the bytes that moved: a fast transfer is
// never cut, however large, and a slow one is cut as soon as it falls behind.
package pace

import (
	"io"
	"time"
)

// Rate is a minimum rate with a grace period.
type Rate struct {
	Grace       time.Duration // what the transfer may take before its first byte
	BytesPerSec int64
}

// Deadline is when a transfer that began at start must have moved done bytes.
func (r Rate) Deadline(start time.Time, done int64) time.Time {
	return start.Add(r.Grace + time.Duration(float64(done)/float64(r.BytesPerSec)*float64(time.Second)))
}

// chunk bounds what one Read or Write moves under one deadline, so that the deadline follows the transfer's
// progress closely.
const chunk = 64 << 10

// Writer writes to W in pieces, setting the connection's write deadline before each so that the whole transfer
// keeps to Rate from Start. SetDeadline is the connection's (http.ResponseController's SetWriteDeadline).
type Writer struct {
	W           io.Writer
	Rate        Rate
	Start       time.Time
	SetDeadline func(time.Time) error
	done        int64
}

func (w *Writer) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		piece := p[:min(len(p), chunk)]
		if err := w.SetDeadline(w.Rate.Deadline(w.Start, w.done+int64(len(piece)))); err != nil {
			return n, err
		}
		k, err := w.W.Write(piece)
		n += k
		w.done += int64(k)
		if err != nil {
			return n, err
		}
		p = p[k:]
	}
	return n, nil
}

// Written is how many bytes went through.
func (w *Writer) Written() int64 { return w.done }

// Reader reads from R, setting the connection's read deadline before each read: the next byte must arrive by
// the time the transfer from Start, at Rate, would have moved it.
type Reader struct {
	R           io.Reader
	Rate        Rate
	Start       time.Time
	SetDeadline func(time.Time) error
	done        int64
}

func (r *Reader) Read(p []byte) (int, error) {
	if len(p) > chunk {
		p = p[:chunk]
	}
	if err := r.SetDeadline(r.Rate.Deadline(r.Start, r.done)); err != nil {
		return 0, err
	}
	n, err := r.R.Read(p)
	r.done += int64(n)
	return n, err
}

// Flush calls flush (which pushes what buffers hold to the connection) under the deadline of everything written.
func (w *Writer) Flush(flush func() error) error {
	if err := w.SetDeadline(w.Rate.Deadline(w.Start, w.done)); err != nil {
		return err
	}
	return flush()
}
