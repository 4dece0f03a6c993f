package testjail

import (
	"strings"
	"testing"
)

func TestScale(t *testing.T) {
	cfg := "name: \"x\"\ntime_limit: 3\n# rlimit_cpu: 9 in a comment\nrlimit_cpu: 3\nrlimit_cpu_type: VALUE\ncgroup_mem_max: 268435456\n"
	got, err := Scale([]byte(cfg), 3)
	if err != nil {
		t.Fatal(err)
	}
	want := strings.NewReplacer("time_limit: 3\n", "time_limit: 9\n", "\nrlimit_cpu: 3\n", "\nrlimit_cpu: 9\n").Replace(cfg)
	if string(got) != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
	if _, err := Scale([]byte("time_limit: 3\n"), 2); err == nil {
		t.Fatal("a definition without rlimit_cpu: scaled")
	}
}
