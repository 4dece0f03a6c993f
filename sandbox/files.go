package sandbox

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"path"
	"slices"
	"strings"
)

// Files in and out of a jail. Input files travel with the script on its pipe; the harness writes them under
// /sandbox before the script runs. Output files are collected by the harness inside the jail (never by the server
// reading the jail's file system) and sent on the result channel in a frame of their own, which the server
// validates again: the harness runs in the script's process, so what it sends is only as trustworthy as the
// script, and a forged frame may only spoil its own answer.

// File is an input file: a path relative to /sandbox and its bytes.
type File struct {
	Path string
	Data []byte
}

// OutputFile is a file a script left under /sandbox: its path relative to /sandbox, its size, and its bytes in
// standard base64, as the contract's answer carries them.
type OutputFile struct {
	Path    string `json:"path"`
	Size    int64  `json:"size"`
	Content string `json:"content"`
}

// OmittedFile is a file a script left under /sandbox that the answer does not carry: it did not fit the caps.
type OmittedFile struct {
	Path string `json:"path"`
	Size int64  `json:"size"`
}

// The caps on what a request's files may be. Input files are bounded by the request's body cap.
const (
	// maxFilesFrame bounds the files frame: MaxOutputBytes in base64, and each file's and omitted file's path (a
	// byte may be escaped to six in JSON), size and the JSON around them.
	maxFilesFrame     = (MaxOutputBytes+2)/3*4 + 2*MaxFiles*(6*MaxPathBytes+128) + 1024
	MaxFiles          = 64      // in a request, and in an answer (and omitted files named in an answer)
	MaxOutputBytes    = 8 << 20 // all output files together
	MaxPathBytes      = 1024    // a file's path under /sandbox
	maxComponentBytes = 255
	// collectCPU bounds the harness's walk of /sandbox in CPU time of its own thread, which measures the tree and
	// not the machine's load: a tree that takes longer to walk is cut and flagged. A walk of the 4,096 inodes
	// /sandbox holds takes some tens of milliseconds.
	collectCPU = 0.5 // seconds
)

// CheckPath says why p is not a file path the contract allows under /sandbox, or returns nil: relative, made of
// non-empty components that are neither "." nor "..", no NUL, within the length limits of the file system.
func CheckPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("the path is empty")
	case strings.HasPrefix(p, "/"):
		return fmt.Errorf("the path must be relative to /sandbox, not absolute")
	case len(p) > MaxPathBytes:
		return fmt.Errorf("the path is longer than %d bytes", MaxPathBytes)
	case strings.ContainsRune(p, 0):
		return fmt.Errorf("the path contains a NUL byte")
	}
	for _, c := range strings.Split(p, "/") {
		switch {
		case c == "":
			return fmt.Errorf("the path has an empty component")
		case c == "." || c == "..":
			return fmt.Errorf("the path has a %q component", c)
		case len(c) > maxComponentBytes:
			return fmt.Errorf("a component of the path is longer than %d bytes", maxComponentBytes)
		}
	}
	return nil
}

// hidden reports whether a path has a component starting with a dot.
func hidden(p string) bool {
	for _, c := range strings.Split(p, "/") {
		if strings.HasPrefix(c, ".") {
			return true
		}
	}
	return false
}

// CheckFiles checks a request's files as a whole: each path, no duplicates, no path that is both a file and a
// directory of another, and no more files and directories than /sandbox has inodes (maxInodes). It returns the
// index of the entry at fault.
func CheckFiles(files []File, maxInodes int) (int, error) {
	if len(files) > MaxFiles {
		return MaxFiles, fmt.Errorf("more than %d files", MaxFiles)
	}
	seen := map[string]int{}
	for i, f := range files {
		if err := CheckPath(f.Path); err != nil {
			return i, err
		}
		if j, dup := seen[f.Path]; dup {
			return i, fmt.Errorf("the path is the same as that of entry %d", j)
		}
		seen[f.Path] = i
	}
	dirs := map[string]bool{}
	for i, f := range files {
		for dir := path.Dir(f.Path); dir != "."; dir = path.Dir(dir) {
			if j, ok := seen[dir]; ok {
				return i, fmt.Errorf("the path is below entry %d's, which is a file", j)
			}
			dirs[dir] = true
		}
		// /sandbox itself is one inode.
		if n := len(dirs) + i + 2; n > maxInodes {
			return i, fmt.Errorf("the files and their directories need more than the %d inodes /sandbox has", maxInodes)
		}
	}
	return 0, nil
}

// EncodeJob is what a jail reads on its script pipe: the script's length (8 bytes, big-endian) and bytes, the
// number of files (4 bytes), and per file its path's length (4 bytes), path, data's length (8 bytes) and data.
func EncodeJob(script []byte, files []File) []byte {
	n := 8 + len(script) + 4
	for _, f := range files {
		n += 4 + len(f.Path) + 8 + len(f.Data)
	}
	b := make([]byte, 0, n)
	b = binary.BigEndian.AppendUint64(b, uint64(len(script)))
	b = append(b, script...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(files)))
	for _, f := range files {
		b = binary.BigEndian.AppendUint32(b, uint32(len(f.Path)))
		b = append(b, f.Path...)
		b = binary.BigEndian.AppendUint64(b, uint64(len(f.Data)))
		b = append(b, f.Data...)
	}
	return b
}

// filesFrame is the files frame's payload as the harness writes it (collect_outputs).
type filesFrame struct {
	Files     []OutputFile  `json:"files"`
	Omitted   []OmittedFile `json:"omitted"`
	Truncated bool          `json:"truncated"`
}

// readFilesFrame validates the files frame's payload as the contract requires the answer's files to be: at most
// MaxFiles files and MaxOutputBytes in all, each path allowed and not hidden, sorted and unique, each content the
// base64 of exactly size bytes; at most MaxFiles omitted files, named the same way and sorted, none also returned,
// and flagged as truncated.
func readFilesFrame(payload []byte) (filesFrame, error) {
	var f filesFrame
	if err := json.Unmarshal(payload, &f); err != nil {
		return f, fmt.Errorf("the files frame is not JSON: %w", err)
	}
	if len(f.Files) > MaxFiles || len(f.Omitted) > MaxFiles {
		return f, fmt.Errorf("%d files and %d omitted, more than %d", len(f.Files), len(f.Omitted), MaxFiles)
	}
	if len(f.Omitted) > 0 && !f.Truncated {
		return f, fmt.Errorf("files omitted without the truncated flag")
	}
	checkPaths := func(paths []string) error {
		for i, p := range paths {
			if err := CheckPath(p); err != nil {
				return fmt.Errorf("file %q: %w", p, err)
			}
			if hidden(p) {
				return fmt.Errorf("file %q is hidden", p)
			}
			if i > 0 && paths[i-1] >= p {
				return fmt.Errorf("files are not sorted and unique at %q", p)
			}
		}
		return nil
	}
	returned := make([]string, len(f.Files))
	var total int64
	for i, file := range f.Files {
		returned[i] = file.Path
		if n, ok := base64Size(file.Content); !ok || n != file.Size {
			return f, fmt.Errorf("file %q: its content is not the base64 of %d bytes", file.Path, file.Size)
		}
		if total += file.Size; total > MaxOutputBytes {
			return f, fmt.Errorf("the files hold more than %d bytes", MaxOutputBytes)
		}
	}
	omitted := make([]string, len(f.Omitted))
	for i, o := range f.Omitted {
		omitted[i] = o.Path
		if o.Size < 0 {
			return f, fmt.Errorf("omitted file %q has a negative size", o.Path)
		}
		if slices.Contains(returned, o.Path) {
			return f, fmt.Errorf("file %q is both returned and omitted", o.Path)
		}
	}
	if err := checkPaths(returned); err != nil {
		return f, err
	}
	return f, checkPaths(omitted)
}

// base64Size reports how many bytes a standard base64 text decodes to, and whether it is valid, decoding it a
// piece at a time: an answer's 8 MiB of files are checked without a second copy of them.
func base64Size(s string) (int64, bool) {
	const piece = 64 << 10 // a multiple of 4: padding can only end the last piece
	buf := make([]byte, base64.StdEncoding.DecodedLen(piece))
	var n int64
	for len(s) > 0 {
		k := min(len(s), piece)
		got, err := base64.StdEncoding.Decode(buf, []byte(s[:k]))
		if err != nil || k < len(s) && got != len(buf) {
			return 0, false
		}
		n += int64(got)
		s = s[k:]
	}
	return n, true
}
