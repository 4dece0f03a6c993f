# The two commands: `make run` and `make test`. Both install the sandbox runtime first if it is missing
# (runtime/install.sh: pinned, hashed, idempotent, and fast when already installed).
SHELL := /bin/bash
export SAFEPY_RUNTIME_DIR ?= $(CURDIR)/.runtime
GO ?= go

FUZZTIME ?= 15s

.PHONY: runtime run local test test-v2 vet fuzz load bench

runtime:
	@./runtime/install.sh "$(SAFEPY_RUNTIME_DIR)"

run: runtime
	LOCAL_ONLY=true $(GO) run ./cmd/server

# The same function under the Functions Framework's own local runner (cmd/local), on 127.0.0.1 only.
local: runtime
	LOCAL_ONLY=true $(GO) run ./cmd/local

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

# -p 1: the packages' tests start real jails and count processes and cgroups; one package at a time keeps
# those counts their own on a 2-core machine.
test: runtime vet
	$(GO) test -p 1 -count=1 -timeout 8m ./...
	@$(MAKE) --no-print-directory fuzz

# The packages that start real jails, again on a kernel with cgroup v2 only, as Debian 12+, Ubuntu 22.04+ and Cloud
# Run's second generation have: each test binary runs in a User-mode Linux guest (.ci/uml), two guests at once, one
# per CPU. The first run on a machine builds the guest's kernel from Debian's sources (some 7 minutes) and caches it.
# The tests fail unless the sandbox in the guest enforces its limits with cgroup v2 and forks its jails.
# Every test runs with the server in the root cgroup (a VM); the limits, the clean-up and the server's own tests run
# again in the two other places a server finds itself: alone in a container's cgroup, behind a cgroup namespace
# (Docker, Cloud Run), and in a systemd service's delegated subtree (a developer's `make run`).
V2_PACKAGES ?= . ./sandbox ./cmd/server
V2_SHAPE_TESTS ?= TestScriptErrors|TestAllJailsTogetherAreCapped|TestSameMemoryOnEveryPath|TestCloseLeavesNothing|TestADeadForkServerIsReleasedAtOnce|TestForkBombDoesNotReachOtherJails|TestLimitsDoNotDependOnLoad|TestNothingSurvivesIntoTheNextRequest|TestEachJailIsAUserOfItsOwn|TestLogs|TestSIGTERM
# The log keeps each package's counts, its TestMain's lines (the detected cgroup mode, whether jails forked, the
# jails' time factor) and every failure in full (.ci/uml/summarize).
V2_TEST = set -o pipefail; SAFEPY_TEST_CGROUP_MODE=cgroup-v2 $(GO) test -v -count=1 -exec "$(CURDIR)/.ci/uml/exec"
V2_LOG = 2>&1 | .ci/uml/summarize
test-v2: runtime
	@.ci/uml/kernel >/dev/null
	@echo "cgroup v2, the server in the root cgroup (a VM): every test"
	@$(V2_TEST) -p 2 -timeout 25m $(V2_PACKAGES) $(V2_LOG)
	@echo "cgroup v2, the server alone in a container's cgroup, behind a cgroup namespace"
	@SAFEPY_UML_RUN_ARGS="-n -g container" $(V2_TEST) -p 2 -timeout 10m -run '$(V2_SHAPE_TESTS)' ./sandbox ./cmd/server $(V2_LOG)
	@echo "cgroup v2, the server in a systemd service's delegated subtree"
	@SAFEPY_UML_RUN_ARGS="-g system.slice/safepy.service" $(V2_TEST) -p 2 -timeout 10m -run '$(V2_SHAPE_TESTS)' ./sandbox ./cmd/server $(V2_LOG)

# Each fuzz target for a short, fixed time, starting from the seed corpus checked in under testdata/fuzz.
fuzz: runtime
	$(GO) test -run '^$$' -fuzz '^FuzzDecodeRequest$$' -fuzztime $(FUZZTIME) .
	$(GO) test -run '^$$' -fuzz '^FuzzResultChannel$$' -fuzztime $(FUZZTIME) ./sandbox
	$(GO) test -run '^$$' -fuzz '^FuzzStdout$$' -fuzztime $(FUZZTIME) ./sandbox

# Latency and throughput of the contract's examples: floor (nsjail alone), service cold, service warm; writes the
# chart the README shows.
bench: runtime
	$(GO) run ./cmd/bench -svg docs/bench.svg

# Mixed good and hostile scripts against a server started in-process on 127.0.0.1 (see cmd/load).
LOAD_N ?= 1000
LOAD_C ?= 0
load: runtime
	$(GO) run ./cmd/load -n $(LOAD_N) -c $(LOAD_C)
