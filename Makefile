# The two commands: `make run` and `make test`. Both install the sandbox runtime first if it is missing
# (runtime/install.sh: pinned, hashed, idempotent, and fast when already installed).
SHELL := /bin/bash
export SAFEPY_RUNTIME_DIR ?= $(CURDIR)/.runtime
GO ?= go

.PHONY: runtime run test vet bench

runtime:
	@./runtime/install.sh "$(SAFEPY_RUNTIME_DIR)"

run: runtime
	$(GO) run ./cmd/local

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

# -p 1: the packages' tests start real jails and count processes and cgroups; one package at a time keeps
# those counts their own on a 2-core machine.
test: runtime vet
	$(GO) test -p 1 -count=1 -timeout 25m ./...
