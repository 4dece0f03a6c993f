package safepy

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// No Docker engine runs here, so the image cannot be built in CI. What can be checked is that the image installs
// the sandbox runtime with the very script and lists CI runs, and that the deploy keeps its safety settings.

func readRepoFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDockerfile(t *testing.T) {
	df := readRepoFile(t, "Dockerfile")
	goMod := readRepoFile(t, "go.mod")
	goVersion := regexp.MustCompile(`(?m)^go (\S+)$`).FindStringSubmatch(goMod)[1]
	froms := regexp.MustCompile(`(?m)^FROM (\S+)`).FindAllStringSubmatch(df, -1)
	if len(froms) != 2 {
		t.Fatalf("want a build stage and a runtime stage, got %v", froms)
	}
	if want := "golang:" + goVersion + "-"; !strings.HasPrefix(froms[0][1], want) {
		t.Errorf("build stage %s: want Go pinned to go.mod's %s", froms[0][1], goVersion)
	}
	if !regexp.MustCompile(`^python:3\.11\.\d+-slim-`).MatchString(froms[1][1]) {
		t.Errorf("runtime stage %s: want a pinned slim CPython 3.11 (the wheels are cp311)", froms[1][1])
	}
	runtimeStage := df[strings.LastIndex(df, "\nFROM "):]
	for _, want := range []string{
		"COPY runtime/ runtime/",          // the pinned lists and the script, as CI has them
		"RUN ./runtime/install.sh ",       // the same install CI runs through `make test`
		"CGO_ENABLED=0 go build",          // a static binary
		"FUNCTION_TARGET=Execute",         // the registered function
		"SAFEPY_RUNTIME_DIR=",             // where install.sh put the runtime
		"COPY nsjail.cfg ./",              // the one jail definition
		"COPY --from=build /out/safe-py ", // only the binary crosses from the build stage
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	for _, banned := range []string{"gcc", "build-essential", "git clone", "curl ", "wget ", "pip install"} {
		if strings.Contains(runtimeStage, banned) {
			t.Errorf("the runtime stage has %q: packages come only from runtime/install.sh's pinned lists", banned)
		}
	}
	di := readRepoFile(t, ".dockerignore")
	for _, want := range []string{".runtime", ".git"} {
		if !strings.Contains(di, want+"\n") {
			t.Errorf(".dockerignore lacks %s", want)
		}
	}
	// And CI installs with the same script.
	if mk := readRepoFile(t, "Makefile"); !strings.Contains(mk, "./runtime/install.sh") || !strings.Contains(readRepoFile(t, ".ci/run"), "make test") {
		t.Error("CI does not run runtime/install.sh through make test")
	}
}

func TestCloudBuild(t *testing.T) {
	cb := readRepoFile(t, "cloudbuild.yaml")
	for _, want := range []string{
		"--execution-environment=gen2",
		"--concurrency=${_SLOTS}",
		"SAFEPY_SLOTS=${_SLOTS}", // Cloud Run's concurrency and the service's slots are one number
		"--cpu=${_CPU}",
		"--memory=${_MEMORY}",
		"--no-allow-unauthenticated",
		"-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/${_SERVICE}", // Artifact Registry
		"_REGION:", "_REPOSITORY:", "_SERVICE:",
	} {
		if !strings.Contains(cb, want) {
			t.Errorf("cloudbuild.yaml lacks %q", want)
		}
	}
	for _, banned := range []string{"gcr.io/$PROJECT_ID", "--allow-unauthenticated", "execution-environment=gen1"} {
		if strings.Contains(cb, banned) {
			t.Errorf("cloudbuild.yaml has %q", banned)
		}
	}
	// The instance must hold its slots at the jail's memory limit, plus the server's share.
	sub := func(name string) string {
		m := regexp.MustCompile(`(?m)^\s+` + name + `: "?([^"\n]+)"?$`).FindStringSubmatch(cb)
		if m == nil {
			t.Fatalf("no substitution %s", name)
		}
		return m[1]
	}
	slots, _ := strconv.Atoi(sub("_SLOTS"))
	cpus, _ := strconv.Atoi(sub("_CPU"))
	mem := sub("_MEMORY")
	memMiB, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSuffix(mem, "Gi"), "Mi"))
	if strings.HasSuffix(mem, "Gi") {
		memMiB *= 1024
	}
	perSlot := (268435456 + warmJailsPerSlot) >> 20
	if slots < 1 || slots > cpus || memMiB < perSlot*slots+serverShare>>20 {
		t.Errorf("%d slots on %d CPUs and %s: want at most one slot per CPU and %d MiB per slot plus %d MiB",
			slots, cpus, mem, perSlot, serverShare>>20)
	}
}
