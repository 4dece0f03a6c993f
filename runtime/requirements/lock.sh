#!/usr/bin/env bash
# Writes one pinned, hashed list of the jail's packages for one CPython minor version, from PyPI:
#   runtime/requirements/lock.sh 3.12 numpy pandas matplotlib >runtime/requirements/cp312.txt
# Extra arguments are requirement specifiers (numpy==2.4.6 keeps a version; a bare name takes the newest with a wheel
# for that Python). The whole dependency tree is resolved for the target Python, not for the one running this script,
# and only manylinux x86_64 wheels count, so the list installs with --no-deps --only-binary=:all: --require-hashes.
# A maintainer's tool: install.sh only reads the lists it writes.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 X.Y requirement..." >&2; exit 2; }
version=$1
shift
abi=cp${version/./}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A recent pip of its own: --python-version/--platform resolution and manylinux_2_28 tags need one.
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2

# Oldest tag first: where a release has wheels for several glibc baselines, take the one that runs on the most hosts.
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64; do
  platforms+=(--platform "$p")
done
"$work/venv/bin/python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --python-version "$version" --implementation cp --abi "$abi" "${platforms[@]}" -d "$work/wheels" "$@" >&2

echo "# Packages importable inside the jail, for CPython $version (${abi}) on manylinux x86_64. Installed by"
echo "# runtime/install.sh with --require-hashes --no-deps --only-binary=:all:, so this list is the whole tree."
echo "# Written by: runtime/requirements/lock.sh $version $*"
for w in "$work"/wheels/*.whl; do
  file=$(basename "$w")
  # A wheel's file name is name-version-...; the name's underscores stand for any of - _ .
  name=$(printf '%s' "${file%%-*}" | tr '_' '-' | tr '[:upper:]' '[:lower:]')
  ver=$(printf '%s' "$file" | cut -d- -f2)
  printf '%s==%s \\\n    --hash=sha256:%s\n' "$name" "$ver" "$(sha256sum "$w" | cut -d' ' -f1)"
done
