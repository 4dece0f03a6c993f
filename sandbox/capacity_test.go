package sandbox

import (
	"runtime"
	"testing"
)

// Slots: one per CPU, fewer where the memory left after what is set aside once cannot hold a jail at its limit and
// its warm jails per slot, never none.
func TestSlots(t *testing.T) {
	cpus := runtime.NumCPU()
	const mib = 1 << 20
	tests := []struct {
		name   string
		jail   int64
		mem    int64
		forked bool
		want   int
	}{
		{"memory unknown", 256 * mib, 0, true, cpus},
		{"plenty", 256 * mib, 1 << 40, true, cpus},
		{"one forked slot", 256 * mib, 256*mib + 256*mib + (256+64)*mib, true, min(cpus, 1)},
		{"two forked slots", 256 * mib, 512*mib + 2*(256+64)*mib, true, min(cpus, 2)},
		{"cold slots hold more", 256 * mib, 256*mib + 2*(256+160)*mib, false, min(cpus, 2)},
		{"too little is still one", 256 * mib, 300 * mib, true, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Slots(tt.jail, tt.mem, tt.forked); got != tt.want {
				t.Fatalf("Slots(%d MiB, %d MiB, forked=%v) = %d, want %d", tt.jail/mib, tt.mem/mib, tt.forked, got, tt.want)
			}
		})
	}
}
