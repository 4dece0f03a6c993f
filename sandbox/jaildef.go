package sandbox

import (
	"fmt"
	"strconv"
	"strings"
)

// textMessage is a message of protobuf's text format, as nsjail.cfg is written: scalar fields (`name: value`) and
// nested messages (`name { ... }`), in order, repeated fields as repeated entries. It is enough of the format to
// read the jail's definition; nsjail itself is the authority on what the file means.
type textMessage struct {
	fields []textField
}

type textField struct {
	name   string
	value  string       // a scalar's value, unquoted and unescaped; "" for a message
	quoted bool         // the value was a string literal (else a number, an enum or a bool)
	msg    *textMessage // a nested message; nil for a scalar
	line   int
}

// parseText parses protobuf text format.
func parseText(src string) (*textMessage, error) {
	p := &textParser{src: src, line: 1}
	m, err := p.message(false)
	if err != nil {
		return nil, fmt.Errorf("line %d: %w", p.line, err)
	}
	return m, nil
}

// scalar returns the last value of a scalar field (the one protobuf keeps), and whether it is set.
func (m *textMessage) scalar(name string) (string, bool) {
	v, ok := "", false
	for _, f := range m.fields {
		if f.name == name && f.msg == nil {
			v, ok = f.value, true
		}
	}
	return v, ok
}

// all returns every value of a repeated scalar field, in order.
func (m *textMessage) all(name string) []string {
	var out []string
	for _, f := range m.fields {
		if f.name == name && f.msg == nil {
			out = append(out, f.value)
		}
	}
	return out
}

// messages returns every nested message of a repeated message field, in order.
func (m *textMessage) messages(name string) []*textMessage {
	var out []*textMessage
	for _, f := range m.fields {
		if f.name == name && f.msg != nil {
			out = append(out, f.msg)
		}
	}
	return out
}

// format writes m back in protobuf text format, one top-level field per line.
func (m *textMessage) format() string {
	var b strings.Builder
	for _, f := range m.fields {
		f.write(&b)
		b.WriteByte('\n')
	}
	return b.String()
}

func (f textField) write(b *strings.Builder) {
	b.WriteString(f.name)
	if f.msg != nil {
		b.WriteString(" {")
		for _, sub := range f.msg.fields {
			b.WriteByte(' ')
			sub.write(b)
		}
		b.WriteString(" }")
		return
	}
	b.WriteString(": ")
	if !f.quoted {
		b.WriteString(f.value)
		return
	}
	b.WriteByte('"')
	for _, c := range []byte(f.value) {
		switch {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c == '\n':
			b.WriteString(`\n`)
		case c == '\t':
			b.WriteString(`\t`)
		case c < 0x20 || c >= 0x7f:
			fmt.Fprintf(b, "\\%03o", c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
}

type textParser struct {
	src  string
	pos  int
	line int
}

func (p *textParser) skip() {
	for p.pos < len(p.src) {
		switch c := p.src[p.pos]; {
		case c == '\n':
			p.line++
			p.pos++
		case c == ' ' || c == '\t' || c == '\r':
			p.pos++
		case c == '#':
			for p.pos < len(p.src) && p.src[p.pos] != '\n' {
				p.pos++
			}
		default:
			return
		}
	}
}

func (p *textParser) message(nested bool) (*textMessage, error) {
	m := &textMessage{}
	for {
		p.skip()
		if p.pos >= len(p.src) {
			if nested {
				return nil, fmt.Errorf("a message is not closed")
			}
			return m, nil
		}
		if p.src[p.pos] == '}' {
			if !nested {
				return nil, fmt.Errorf("unexpected '}'")
			}
			p.pos++
			return m, nil
		}
		start := p.pos
		for p.pos < len(p.src) && (isIdent(p.src[p.pos])) {
			p.pos++
		}
		name := p.src[start:p.pos]
		if name == "" {
			return nil, fmt.Errorf("expected a field name at %q", p.src[p.pos:min(p.pos+20, len(p.src))])
		}
		f := textField{name: name, line: p.line}
		p.skip()
		colon := p.pos < len(p.src) && p.src[p.pos] == ':'
		if colon {
			p.pos++
			p.skip()
		}
		if p.pos < len(p.src) && p.src[p.pos] == '{' {
			p.pos++
			sub, err := p.message(true)
			if err != nil {
				return nil, err
			}
			f.msg = sub
		} else if !colon {
			return nil, fmt.Errorf("field %s has neither a value nor a message", name)
		} else {
			f.quoted = p.src[p.pos] == '"' || p.src[p.pos] == '\''
			v, err := p.scalar()
			if err != nil {
				return nil, fmt.Errorf("field %s: %w", name, err)
			}
			f.value = v
		}
		m.fields = append(m.fields, f)
		p.skip()
		if p.pos < len(p.src) && (p.src[p.pos] == ',' || p.src[p.pos] == ';') {
			p.pos++
		}
	}
}

func isIdent(c byte) bool {
	return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// scalar reads a quoted string (adjacent strings concatenate) or a bare number, enum or bool.
func (p *textParser) scalar() (string, error) {
	if p.pos < len(p.src) && (p.src[p.pos] == '"' || p.src[p.pos] == '\'') {
		var b strings.Builder
		for p.pos < len(p.src) && (p.src[p.pos] == '"' || p.src[p.pos] == '\'') {
			s, err := p.quoted()
			if err != nil {
				return "", err
			}
			b.WriteString(s)
			p.skip()
		}
		return b.String(), nil
	}
	start := p.pos
	for p.pos < len(p.src) && (isIdent(p.src[p.pos]) || p.src[p.pos] == '-' || p.src[p.pos] == '.' || p.src[p.pos] == '+') {
		p.pos++
	}
	if start == p.pos {
		return "", fmt.Errorf("expected a value")
	}
	return p.src[start:p.pos], nil
}

func (p *textParser) quoted() (string, error) {
	q := p.src[p.pos]
	end := p.pos + 1
	for end < len(p.src) && p.src[end] != q {
		if p.src[end] == '\\' {
			end++
		}
		if end < len(p.src) && p.src[end] == '\n' {
			return "", fmt.Errorf("a string runs past the end of its line")
		}
		end++
	}
	if end >= len(p.src) {
		return "", fmt.Errorf("a string is not closed")
	}
	raw := p.src[p.pos+1 : end]
	p.pos = end + 1
	if q == '\'' {
		raw = strings.ReplaceAll(strings.ReplaceAll(raw, `\'`, `'`), `"`, `\"`)
	}
	s, err := strconv.Unquote(`"` + raw + `"`)
	if err != nil {
		return "", fmt.Errorf("bad escape in %q: %w", raw, err)
	}
	return s, nil
}
