package safepy

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/safe-py/safepy/internal/jaildef"
	"github.com/safe-py/safepy/sandbox"
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
	// The build stage's Go is pinned to a patch release (a digest may follow) and can build go.mod: the image sets
	// GOTOOLCHAIN=local, so a go line newer than the image's Go fails the build.
	golang := regexp.MustCompile(`^golang:(\d+\.\d+\.\d+)-[a-z]+(@sha256:[0-9a-f]{64})?$`).FindStringSubmatch(froms[0][1])
	if golang == nil {
		t.Errorf("build stage %s: want golang:X.Y.Z-DEBIAN, pinned to a patch release", froms[0][1])
	} else if newer(goVersion, golang[1]) {
		t.Errorf("build stage %s: its Go cannot build go.mod's go %s", froms[0][1], goVersion)
	}
	// The runtime stage is a pinned slim CPython 3.X.Y that the runtime's lists support (install.sh checks the minor
	// when the image is built); a digest may follow.
	if !regexp.MustCompile(`^python:3\.1[0-3]\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?$`).MatchString(froms[1][1]) {
		t.Errorf("runtime stage %s: want python:3.X.Y-slim-DEBIAN, a patch release of CPython 3.10 to 3.13", froms[1][1])
	}
	if !strings.Contains(df, "refresh the pins") || !strings.Contains(df, "@sha256:") {
		t.Error("the Dockerfile does not say how to refresh its pins, and that a digest pin is better")
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
		"go build -trimpath -ldflags=\"-s -w\" -o /out/safe-py ./cmd/server", // the production server
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

// newer reports whether Go version a (1.26 or 1.26.8) is newer than b.
func newer(a, b string) bool {
	pa, pb := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < max(len(pa), len(pb)); i++ {
		var x, y int
		if i < len(pa) {
			x, _ = strconv.Atoi(pa[i])
		}
		if i < len(pb) {
			y, _ = strconv.Atoi(pb[i])
		}
		if x != y {
			return x > y
		}
	}
	return false
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
		"_REGION:", "_REPOSITORY:", "_SERVICE:", "_RUNTIME_SA:",
		// Its own identity, with no roles (the README's setup grants it none).
		"--service-account=${_RUNTIME_SA}@$PROJECT_ID.iam.gserviceaccount.com",
		// Probes on the path Cloud Run's front end lets through.
		"--startup-probe=httpGet.path=/health,", "--liveness-probe=httpGet.path=/health,",
		// The build runs as its own service account, which requires logs in Cloud Logging (or a bucket of one's own).
		"logging: CLOUD_LOGGING_ONLY",
	} {
		if !strings.Contains(cb, want) {
			t.Errorf("cloudbuild.yaml lacks %q", want)
		}
	}
	for _, banned := range []string{"gcr.io/$PROJECT_ID", "--allow-unauthenticated", "execution-environment=gen1", "/healthz"} {
		if strings.Contains(cb, banned) {
			t.Errorf("cloudbuild.yaml has %q", banned)
		}
	}
	// The image is pushed once: by the push step, which the deploy step needs before it, and not again by images:.
	if pushes := strings.Count(cb, `args: ["push", `); pushes != 1 || regexp.MustCompile(`(?m)^images:`).MatchString(cb) {
		t.Errorf("want exactly one push, by a step, and no images: list (%d push steps)", pushes)
	}
	if strings.Index(cb, "id: push") > strings.Index(cb, "id: deploy") {
		t.Error("the deploy step comes before the push step")
	}
	// The instance must hold its slots at the jail's memory limit with their warm jails, plus the server's share and
	// the fork servers.
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
	cfg, err := ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	def, err := jaildef.Read(cfg.Sandbox.Nsjail, "nsjail.cfg")
	if err != nil {
		t.Fatal(err)
	}
	limits := def.Limits()
	perSlot, fixed := sandbox.MemoryPlan(limits.MemoryBytes, true)
	if slots < 1 || slots > cpus || int64(memMiB)<<20 < perSlot*int64(slots)+fixed {
		t.Errorf("%d slots on %d CPUs and %s: want at most one slot per CPU and %d MiB per slot plus %d MiB",
			slots, cpus, mem, perSlot>>20, fixed>>20)
	}
	if int64(memMiB)<<20 >= perSlot*int64(slots+1)+fixed && slots < cpus {
		t.Errorf("%s holds %d slots, but only %d are used", mem, slots+1, slots)
	}
}

// The README's deploy section is the one-time setup the build needs and the command that uses it: the roles the
// build's own service account needs for build, push and deploy, none for the service's, and the probes' path.
func TestDeployDocs(t *testing.T) {
	readme := readRepoFile(t, "README.md")
	i := strings.Index(readme, "## Deploy to Cloud Run")
	if i < 0 {
		t.Fatal("no deploy section")
	}
	deploy := readme[i:]
	if j := strings.Index(deploy[3:], "\n## "); j >= 0 {
		deploy = deploy[:j+3]
	}
	for _, want := range []string{
		"gcloud iam service-accounts create safe-py-runtime",
		"gcloud iam service-accounts create safe-py-deployer",
		"--role=roles/artifactregistry.writer", // push
		"--role=roles/run.admin",               // deploy
		"gcloud iam service-accounts add-iam-policy-binding $RUNTIME \\\n  --member=serviceAccount:$DEPLOYER --role=roles/iam.serviceAccountUser",
		"--role=roles/logging.logWriter", // the build's logs
		"gcloud builds submit --config cloudbuild.yaml",
		"--service-account=projects/$PROJECT/serviceAccounts/$DEPLOYER",
		"_RUNTIME_SA=safe-py-runtime",
		"`--startup-probe` and `--liveness-probe` on `/health`",
	} {
		if !strings.Contains(deploy, want) {
			t.Errorf("the README's deploy section lacks %q", want)
		}
	}
	// The runtime service account is granted nothing: it is only ever the member's target, never the member.
	if strings.Contains(deploy, "--member=serviceAccount:$RUNTIME") {
		t.Error("the README grants the runtime service account a role")
	}
}
