package sandbox

import "testing"

// The offsets of a time namespace as the kernel writes and reads them: whole seconds down, nanoseconds in [0, 1e9).
func TestTimeOffsets(t *testing.T) {
	for _, tt := range []struct {
		host int64
		want string
	}{{0, "0 0"}, {1, "-1 999999999"}, {2_500_000_000, "-3 500000000"}, {7_000_000_000, "-7 0"}} {
		if got := zeroOffset(tt.host); got != tt.want {
			t.Errorf("zeroOffset(%d) = %q, want %q", tt.host, got, tt.want)
		}
	}
	got, err := parseTimeOffsets("monotonic      -86400    250\nboottime  3 0\n")
	if err != nil || got["monotonic"] != -86400*1e9+250 || got["boottime"] != 3e9 {
		t.Fatalf("%v %v", got, err)
	}
	if _, err := parseTimeOffsets("realtime 1 0\n"); err == nil {
		t.Fatal("a clock a time namespace has not: accepted")
	}
}
