package pace

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

func TestDeadline(t *testing.T) {
	start := time.Unix(1000, 0)
	r := Rate{Grace: 5 * time.Second, BytesPerSec: 1 << 20}
	for _, tt := range []struct {
		done int64
		want time.Duration
	}{{0, 5 * time.Second}, {1 << 20, 6 * time.Second}, {10 << 20, 15 * time.Second}, {512 << 10, 5500 * time.Millisecond}} {
		if got := r.Deadline(start, tt.done).Sub(start); got != tt.want {
			t.Errorf("%d bytes: %s, want %s", tt.done, got, tt.want)
		}
	}
}

// The writer sets a deadline before every piece, each for the bytes moved so far and the piece; a deadline it
// cannot set stops the write.
func TestWriterSetsADeadlinePerPiece(t *testing.T) {
	start := time.Unix(1000, 0)
	var deadlines []time.Duration
	var out bytes.Buffer
	w := &Writer{W: &out, Rate: Rate{Grace: time.Second, BytesPerSec: chunk}, Start: start,
		SetDeadline: func(d time.Time) error { deadlines = append(deadlines, d.Sub(start)); return nil }}
	data := strings.Repeat("x", 2*chunk+10)
	if n, err := w.Write([]byte(data)); n != len(data) || err != nil || out.String() != data || w.Written() != int64(len(data)) {
		t.Fatalf("wrote %d, %v", n, err)
	}
	want := []time.Duration{2 * time.Second, 3 * time.Second, 3*time.Second + 10*time.Second/chunk}
	if len(deadlines) != len(want) {
		t.Fatalf("deadlines %v, want %v", deadlines, want)
	}
	for i := range want {
		if deadlines[i] != want[i] {
			t.Fatalf("deadlines %v, want %v", deadlines, want)
		}
	}
	broken := errors.New("gone")
	w = &Writer{W: &out, Rate: Rate{Grace: time.Second, BytesPerSec: 1}, Start: start, SetDeadline: func(time.Time) error { return broken }}
	if n, err := w.Write([]byte("abc")); n != 0 || !errors.Is(err, broken) {
		t.Fatalf("%d, %v", n, err)
	}
}

// The reader asks for the next byte by the deadline of the bytes so far, and never reads more than a piece at once.
func TestReaderSetsADeadlinePerRead(t *testing.T) {
	start := time.Unix(1000, 0)
	var deadlines []time.Duration
	r := &Reader{R: strings.NewReader(strings.Repeat("y", chunk+1)), Rate: Rate{Grace: time.Second, BytesPerSec: chunk}, Start: start,
		SetDeadline: func(d time.Time) error { deadlines = append(deadlines, d.Sub(start)); return nil }}
	buf := make([]byte, 3*chunk)
	if n, err := r.Read(buf); n != chunk || err != nil {
		t.Fatalf("first read: %d bytes, %v", n, err)
	}
	if n, err := r.Read(buf); n != 1 || err != nil {
		t.Fatalf("second read: %d bytes, %v", n, err)
	}
	if n, err := r.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("third read: %d bytes, %v", n, err)
	}
	want := []time.Duration{time.Second, 2 * time.Second, 2*time.Second + time.Second/chunk}
	for i := range want {
		if deadlines[i] != want[i] {
			t.Fatalf("deadlines %v, want %v", deadlines, want)
		}
	}
}
