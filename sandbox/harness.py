# The harness: the first and only program a cold jail starts, and what a fork server's child becomes once it has
# built its jail (forkserver.py). It is embedded in the Go binary, which writes it to a private file at start-up;
# the jail mounts that one file read-only at /safepy/harness.py.
#
# Channels (file descriptors set up by the Go side and passed through nsjail):
#   3  the job, read to EOF, then closed: the script's length (8 bytes, big-endian) and source, the number of input
#      files (4 bytes), and per file its path's length (4 bytes), path, data's length (8 bytes) and data
#      (sandbox/files.go, EncodeJob). The files are written under /sandbox before the script runs.
#   4  the result channel: one byte b"S" once the interpreter is up, then at most one files frame and exactly one
#      result frame, each a kind byte, the payload's length (8 bytes, big-endian) and the payload:
#        b"F": a JSON object {"files": [{"path", "size", "content" (base64)}], "omitted": [{"path", "size"}],
#              "truncated": bool}: the files under /sandbox when main() returned or raised that the answer carries,
#              and those it leaves out (collect_outputs; sandbox/files.go checks it again);
#        b"R": the JSON text of main()'s return value, or
#        b"E": a JSON object {"kind", "type", "message", "traceback", "errno"}.
#      The length lets the server answer as soon as the frame is in, without waiting for the jail to wind down:
#      after its last frame the script's process stops itself, and the server takes the jail down once it has
#      answered.
#   1, 2  the script's stdout and stderr; the Go side captures them at the descriptor level.
#
# Process layout: this process is PID 1 of the jail's PID namespace. It forks once; the child runs the script, and
# PID 1 stays behind as a minimal init: it reaps orphans (so zombies never fill the process limit) and, when the
# script's process ends, exits with a status that encodes how it ended (the exit code, or 128 + the signal). The
# kernel then kills every other process in the namespace. A signal the script sends to itself therefore behaves as
# it would outside a container, which it would not if the script ran as PID 1.
import json
import os
import resource
import sys

SCRIPT_FD, RESULT_FD = 3, 4


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def set_rlimits(rlimits):
    def value(v):
        return resource.RLIM_INFINITY if v >= 1 << 63 else v  # the Go side's Infinity

    for name, limit in sorted((rlimits or {}).items()):
        resource.setrlimit(getattr(resource, name), (value(limit["Soft"]), value(limit["Hard"])))


MATPLOTLIB_CACHE = "/usr/local/share/safepy-matplotlib"  # runtime/install.sh builds it


def prepare_matplotlib():
    """matplotlib wants a writable MPLCONFIGDIR, and builds its font cache there on first import (a second or more,
    and a line on stderr). Give it one in the jail's /tmp, holding the cache the runtime was installed with."""
    conf = os.environ.get("MPLCONFIGDIR")
    if not conf or not os.path.isdir(MATPLOTLIB_CACHE):
        return
    os.makedirs(conf, exist_ok=True)
    for name in os.listdir(MATPLOTLIB_CACHE):
        try:
            os.symlink(os.path.join(MATPLOTLIB_CACHE, name), os.path.join(conf, name))
        except FileExistsError:
            pass


def init(config):
    """Be the jail's PID 1. config is the Go side's harnessConfig (sandbox.go): the script's CPU-time limit, per
    process, counted from its arrival; the resource limits nsjail cannot set; modules to import before the script
    arrives (a warm jail)."""
    import signal

    # Before anything else runs in the jail, and so for every process it will have.
    set_rlimits(config["rlimits"])
    prepare_matplotlib()

    # As PID 1 we would ignore SIGINT only by kernel rule; make it explicit so no handler of Python's runs here.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        exit_as_the_interpreter_would(lambda: run(config))
    os.close(SCRIPT_FD)
    os.close(RESULT_FD)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(71)
        except InterruptedError:
            continue
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else min(code, 127))


def exit_as_the_interpreter_would(main):
    """Run main and end the process as CPython ends one whose top-level code raised or returned: SystemExit's code
    (printed, and 1, if it is not a number), a traceback and 1 for any other exception, SIGINT for an uncaught
    KeyboardInterrupt; non-daemon threads joined, atexit handlers run, stdio flushed. A forked process must do this
    itself (the interpreter's own exit is the fork server's), and a cold jail does the same so that the two paths
    cannot differ."""
    import signal
    import traceback

    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            try:
                print(code, file=sys.stderr)
            except Exception:
                pass
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def read_job():
    """Read the job. It is complete once every part it declares is in: the read does not wait for the server to
    close its end of the channel."""

    def take(n):
        part = bytearray(n)
        view, got = memoryview(part), 0
        while got < n:
            k = os.readv(SCRIPT_FD, [view[got:]])
            if k == 0:
                raise ValueError("the job ends early")
            got += k
        return part

    source = bytes(take(int.from_bytes(take(8), "big")))
    files = []
    for _ in range(int.from_bytes(take(4), "big")):
        path = take(int.from_bytes(take(4), "big")).decode("utf-8")
        files.append((path, take(int.from_bytes(take(8), "big"))))
    os.close(SCRIPT_FD)
    return source, files


def write_inputs(files):
    """Write the request's files under /sandbox (the server checked their paths), and return what each held (its
    size and hash), so that one the script leaves unchanged is not sent back."""
    import hashlib

    written = {}
    for path, data in files:
        full = "/sandbox/" + path
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        written[path] = (len(data), hashlib.sha256(data).digest())
    return written


def collect_outputs(inputs, max_files, max_bytes, max_path, max_cpu):
    """What the answer carries of /sandbox: the regular files under it, less the hidden ones (a component starting
    with a dot) and the inputs left unchanged. Of those, the smallest that fit max_files and max_bytes are returned
    (ties by path), the rest named with their sizes; a script may use its working directory as scratch space, and a
    file that does not fit is left out, never an error, and never returned cut short. Returns (files, omitted,
    truncated): files sorted by path with their content in base64, omitted sorted by path (at most max_files), and
    whether anything was left out or not looked at.

    The walk holds each directory open and opens what is in it relative to it, never following a symlink
    (O_NOFOLLOW on every component), and never opens a FIFO, socket or device for reading (O_NONBLOCK, then fstat):
    what a script swaps in while it runs cannot lead it out of /sandbox or make it wait. Only the files returned are
    read (a sparse file of any size costs a stat). A subtree deeper than an answer's path may be, or deeper than the
    descriptors the walk may hold, is cut; so is the rest of a walk that took more than max_cpu seconds of this
    thread's CPU (a measure of the tree, not of the machine's load); what was cut is flagged as truncated."""
    import base64
    import errno
    import hashlib
    import stat
    import time

    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    dir_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
    budget = time.thread_time() + max_cpu
    found = []  # (size, path, inode)
    cut = False

    def read_all(fd, limit):
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            size += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    def walk(dir_fd, rel):
        nonlocal cut
        try:
            names = sorted(os.listdir(dir_fd))
        except OSError:
            cut = True  # a directory it cannot list: what is in it is not looked at
            return
        for name in names:
            if time.thread_time() >= budget:  # >=: a clock that has not moved (a coarse one) is no time at all
                cut = True
                return
            if name.startswith("."):
                continue
            path = rel + name
            try:
                encoded = path.encode("utf-8")
            except UnicodeEncodeError:
                continue  # a name that is not UTF-8 cannot be named in the answer
            if len(encoded) > max_path:
                cut = True  # deeper or longer than an answer's path may be
                continue
            try:
                fd = os.open(name, flags, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):  # deeper than the descriptors the walk may hold
                    cut = True
                continue  # a symlink (ELOOP), or gone
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    walk(fd, path + "/")
                elif stat.S_ISREG(st.st_mode):
                    given = inputs.get(path)
                    if given is not None and given[0] == st.st_size and given[1] == hashlib.sha256(
                            read_all(fd, st.st_size)).digest():
                        continue  # an input left as it came
                    found.append((st.st_size, path, st.st_ino))
            finally:
                os.close(fd)

    def reopen(path):
        """The file at path, opened component by component as the walk did, or None if it is no longer there."""
        parts = path.split("/")
        fds = []
        try:
            at = os.open("/sandbox", dir_flags)
            fds.append(at)
            for part in parts[:-1]:
                at = os.open(part, dir_flags, dir_fd=at)
                fds.append(at)
            return os.open(parts[-1], flags, dir_fd=at)
        except OSError:
            return None
        finally:
            for fd in fds:
                os.close(fd)

    try:
        root = os.open("/sandbox", dir_flags)
    except OSError:
        return [], [], False
    try:
        walk(root, "")
    finally:
        os.close(root)

    # The smallest first, ties by path: the most files that fit.
    found.sort()
    kept, omitted, total = [], [], 0
    for size, path, ino in found:
        if len(kept) < max_files and total + size <= max_bytes:
            kept.append((path, size, ino))
            total += size
        else:
            omitted.append((path, size))
    files = []
    for path, size, ino in sorted(kept):
        fd = reopen(path)
        data = None
        if fd is not None:
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_ino == ino:
                    data = read_all(fd, size)
            finally:
                os.close(fd)
        if data is None or len(data) != size:  # changed under the walk: left out rather than sent otherwise
            omitted.append((path, size))
            continue
        files.append({"path": path, "size": size, "content": base64.b64encode(data).decode("ascii")})
    omitted.sort()
    return files, [{"path": p, "size": n} for p, n in omitted[:max_files]], cut or bool(omitted)


def exercise(source):
    """Compile, run and encode a script's answer the way run() does, with nothing of the channels: what a fork
    server trains on."""
    import linecache
    import types

    text = source
    filename = "/sandbox/script.py"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    module = types.ModuleType("script")
    module.__file__ = filename
    exec(compile(text, filename, "exec", dont_inherit=True), module.__dict__)
    json.dumps(module.main(), allow_nan=False, ensure_ascii=False).encode("utf-8")
    linecache.cache.pop(filename, None)
    collect_outputs({}, 1, 1, 1, 1)  # the collection's own code, on an empty /sandbox


def run(config):
    # Keep the result channel away from anything the script starts.
    os.set_inheritable(RESULT_FD, False)
    # Everything the harness itself needs is imported before it reports ready, so a warm jail does none of it on
    # the script's time.
    import base64, ctypes, hashlib, linecache, stat, traceback, types  # noqa: F401,E401

    for name in config["preload"] or []:
        __import__(name)
    if config.get("prefault"):
        # A warm jail forked from a fork server takes now, before it says it is ready, what a typical script would
        # otherwise take on its time (forkserver.py's train): the copies of the fork server's pages it writes, and
        # the page table entries of the code it runs. Ready only after: the pool learns how long a prefaulted jail
        # takes to be ready, and a request that comes meanwhile waits for it as for any jail being made.
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for advice, kind in ((23, "write"), (22, "read")):  # MADV_POPULATE_WRITE, MADV_POPULATE_READ
            for start, length in config["prefault"][kind]:
                libc.madvise(start, length, advice)
    write_all(RESULT_FD, b"S")

    source, files = read_job()
    inputs = write_inputs(files)
    cpu_seconds = config["cpu"]

    # The script's time counts from now, not from the jail's start: what the harness spent starting up and
    # preloading is not the script's. RLIMIT_CPU is whole seconds; the hard limit kills one second after SIGXCPU.
    # (Memory is not reset: the jail's limit is its total, preloaded modules included, warm or cold alike.)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(usage.ru_utime + usage.ru_stime + cpu_seconds + 0.999)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))

    filename = "/sandbox/script.py"
    owner = os.getpid()

    def describe(exc):
        try:
            return str(exc)
        except Exception:
            return "<exception text could not be printed>"

    def clip(text, limit=1 << 16):
        return text if len(text) <= limit else text[:limit] + "\n[... cut at %d characters]" % limit

    def fail(kind, exc=None, message=None):
        err = {"kind": kind}
        if exc is not None:
            err["type"] = type(exc).__name__
            err["message"] = clip(message or "%s: %s" % (type(exc).__name__, describe(exc)))
            if kind != "serialization":
                te = traceback.TracebackException.from_exception(exc)
                # Drop the harness's own frames: the traceback starts in the script.
                te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != __file__])
                err["traceback"] = clip("".join(te.format()))
            if isinstance(exc, OSError) and exc.errno is not None:
                err["errno"] = exc.errno
        else:
            err["message"] = message
        finish(b"E", json.dumps(err).encode())

    def frame(kind, payload):
        return kind + len(payload).to_bytes(8, "big") + payload

    def finish(kind, payload):
        if os.getpid() != owner:  # a process the script forked got here: only the script's own process answers
            os._exit(0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        try:  # what C code buffered with stdio, which os._exit would drop
            ctypes.CDLL(None).fflush(None)
        except Exception:
            pass
        try:
            files, omitted, truncated = collect_outputs(inputs, config["max_files"], config["max_file_bytes"],
                                                        config["max_path_bytes"], config["collect_cpu"])
        except Exception:  # a walk that failed part way: its answer stands, without files, and says so
            files, omitted, truncated = [], [], True
        # stdout is flushed above, before the frames: the server takes what the pipe holds when the frame is in.
        outputs = b""
        if files or truncated:
            outputs = frame(b"F", json.dumps({"files": files, "omitted": omitted, "truncated": truncated}).encode())
        write_all(RESULT_FD, outputs + frame(kind, payload))
        # The answer is out: the Go side takes the jail down once it has sent it. Exiting now would have the
        # kernel take this big address space down while the server answers.
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)

    try:
        text = source.decode("utf-8")
        lines = text.splitlines(True)
        linecache.cache[filename] = (len(text), None, lines, filename)
        code = compile(text, filename, "exec", dont_inherit=True)
    except Exception as exc:  # SyntaxError mostly; also RecursionError or MemoryError from a pathological source
        fail("syntax", exc)

    module = types.ModuleType("script")
    module.__file__ = filename
    sys.modules["script"] = module
    try:
        exec(code, module.__dict__)
        main = module.__dict__.get("main")
        if not callable(main):
            fail("missing_main", message="main() is missing or not callable")
        result = main()
    except Exception as exc:
        fail("exception", exc)

    try:
        sys.set_int_max_str_digits(0)
        # The encoder recurses in C: a script that raised the recursion limit could crash it on a deep result.
        sys.setrecursionlimit(1000)
        payload = json.dumps(result, allow_nan=False, ensure_ascii=False)
        try:
            data = payload.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: keep them, as JSON escapes
            data = json.dumps(result, allow_nan=False).encode("ascii")
    except (TypeError, ValueError, RecursionError, OverflowError) as exc:
        fail("serialization", exc,
             "main() must return JSON-serializable data: %s: %s" % (type(exc).__name__, describe(exc)))
    finish(b"R", data)


if __name__ == "__main__":
    init(json.loads(sys.argv[1]))
