package sandbox

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Limits are the jail's resource limits. They are read from nsjail.cfg, the one place they are written down, so
// the Go side enforces exactly what the file declares.
type Limits struct {
	Wall        time.Duration // time_limit
	MemoryBytes int64         // cgroup_mem_max
	Processes   int64         // cgroup_pids_max
	CPUMsPerSec int64         // cgroup_cpu_ms_per_sec
	CPUSeconds  int64         // rlimit_cpu
	FileSizeMiB int64         // rlimit_fsize
	TmpfsBytes  int64         // the size= of the /sandbox tmpfs
}

// ReadLimits parses the top-level scalar fields of an nsjail text-format config that the Go side enforces itself.
// It is not a protobuf parser: nested messages are skipped except for the /sandbox mount's size.
func ReadLimits(path string) (Limits, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Limits{}, fmt.Errorf("reading the jail config: %w", err)
	}
	fields := map[string]string{}
	depth := 0
	sc := bufio.NewScanner(bytes.NewReader(data))
	var tmpfs int64
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if i := strings.Index(line, "#"); i >= 0 && !strings.Contains(line[:i], `"`) {
			line = strings.TrimSpace(line[:i])
		}
		if line == "" {
			continue
		}
		if depth == 0 && strings.Contains(line, `dst: "/sandbox"`) {
			if i := strings.Index(line, "size="); i >= 0 {
				end := strings.IndexAny(line[i+5:], `,"`)
				if end > 0 {
					tmpfs, _ = strconv.ParseInt(line[i+5:i+5+end], 10, 64)
				}
			}
		}
		opens, closes := strings.Count(line, "{"), strings.Count(line, "}")
		if depth == 0 && opens == 0 {
			if k, v, ok := strings.Cut(line, ":"); ok {
				fields[strings.TrimSpace(k)] = strings.Trim(strings.TrimSpace(v), `"`)
			}
		}
		depth += opens - closes
	}
	num := func(key string) (int64, error) {
		v, ok := fields[key]
		if !ok {
			return 0, fmt.Errorf("%s: %s is not set; the sandbox needs every limit written down", path, key)
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return 0, fmt.Errorf("%s: %s must be a positive integer, not %q", path, key, v)
		}
		return n, nil
	}
	var l Limits
	var wall int64
	for _, f := range []struct {
		key string
		dst *int64
	}{
		{"time_limit", &wall},
		{"cgroup_mem_max", &l.MemoryBytes},
		{"cgroup_pids_max", &l.Processes},
		{"cgroup_cpu_ms_per_sec", &l.CPUMsPerSec},
		{"rlimit_cpu", &l.CPUSeconds},
		{"rlimit_fsize", &l.FileSizeMiB},
	} {
		if *f.dst, err = num(f.key); err != nil {
			return Limits{}, err
		}
	}
	l.Wall = time.Duration(wall) * time.Second
	l.TmpfsBytes = tmpfs
	return l, nil
}

func mib(n int64) string { return fmt.Sprintf("%d MiB", n>>20) }
