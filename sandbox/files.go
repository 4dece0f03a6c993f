package sandbox

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"path"
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

// The caps on what a request's files may be. Input files are bounded by the request's body cap.
const (
	// maxFilesFrame bounds the files frame: MaxOutputBytes in base64, and each file's path (a byte may be escaped
	// to six in JSON), size and the JSON around them.
	maxFilesFrame     = (MaxOutputBytes+2)/3*4 + MaxFiles*(6*maxPathBytes+128) + 1024
	MaxFiles          = 64      // in a request, and in an answer
	MaxOutputBytes    = 8 << 20 // all output files together
	maxPathBytes      = 1024
	maxComponentBytes = 255
)

// CheckPath says why p is not a file path the contract allows under /sandbox, or returns nil: relative, made of
// non-empty components that are neither "." nor "..", no NUL, within the length limits of the file system.
func CheckPath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("the path is empty")
	case strings.HasPrefix(p, "/"):
		return fmt.Errorf("the path must be relative to /sandbox, not absolute")
	case len(p) > maxPathBytes:
		return fmt.Errorf("the path is longer than %d bytes", maxPathBytes)
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

// readFilesFrame validates the files frame's payload as the contract requires the answer's files to be: at most
// MaxFiles and MaxOutputBytes in all, each path allowed and not hidden, sorted and unique, each content the
// base64 of exactly size bytes.
func readFilesFrame(payload []byte) ([]OutputFile, error) {
	var files []OutputFile
	if err := json.Unmarshal(payload, &files); err != nil {
		return nil, fmt.Errorf("the files frame is not JSON: %w", err)
	}
	if len(files) > MaxFiles {
		return nil, fmt.Errorf("%d files, more than %d", len(files), MaxFiles)
	}
	var total int64
	for i, f := range files {
		if err := CheckPath(f.Path); err != nil {
			return nil, fmt.Errorf("file %q: %w", f.Path, err)
		}
		if hidden(f.Path) {
			return nil, fmt.Errorf("file %q is hidden", f.Path)
		}
		if i > 0 && files[i-1].Path >= f.Path {
			return nil, fmt.Errorf("files are not sorted and unique at %q", f.Path)
		}
		data, err := base64.StdEncoding.DecodeString(f.Content)
		if err != nil || int64(len(data)) != f.Size {
			return nil, fmt.Errorf("file %q: its content is not the base64 of %d bytes", f.Path, f.Size)
		}
		if total += f.Size; total > MaxOutputBytes {
			return nil, fmt.Errorf("the files hold more than %d bytes", MaxOutputBytes)
		}
	}
	return files, nil
}
