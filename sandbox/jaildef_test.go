package sandbox

import (
	"os"
	"testing"
)

// What the fork server's config is generated from: nsjail.cfg, parsed and written back, means the same to nsjail.
func TestTextFormatRoundTrip(t *testing.T) {
	data, err := os.ReadFile("../nsjail.cfg")
	if err != nil {
		t.Fatal(err)
	}
	m, err := parseText(string(data))
	if err != nil {
		t.Fatal(err)
	}
	again, err := parseText(m.format())
	if err != nil {
		t.Fatal(err)
	}
	if again.format() != m.format() {
		t.Fatalf("parsing the written file gives another file:\n%s\n---\n%s", m.format(), again.format())
	}
	content, _ := m.messages("mount")[1].scalar("src_content")
	if content == "" || content[len(content)-1] != '\n' {
		t.Fatalf("escapes were not read: %q", content)
	}
}
