# The harness: the first and only program a cold jail starts, and what a fork server's child becomes once it has
# built its jail (forkserver.py). It is embedded in the Go binary, which writes it to a private file at start-up;
# the jail mounts that one file read-only at /safepy/harness.py.
#
# Channels (file descriptors set up by the Go side and passed through nsjail):
#   3  the script's source; read to EOF, then closed.
#   4  the result channel: one byte b"S" once the interpreter is up, then exactly one frame, a kind byte, the
#      payload's length (8 bytes, big-endian) and the payload:
#        b"R": the JSON text of main()'s return value, or
#        b"E": a JSON object {"kind", "type", "message", "traceback", "errno"}.
#      The length lets the server answer as soon as the frame is in, without waiting for the jail to wind down.
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


def init(config):
    """Be the jail's PID 1. config is the Go side's harnessConfig (sandbox.go): the script's CPU-time limit, per
    process, counted from its arrival; the resource limits nsjail cannot set; modules to import before the script
    arrives (a warm jail)."""
    import signal

    # Before anything else runs in the jail, and so for every process it will have.
    set_rlimits(config["rlimits"])

    # As PID 1 we would ignore SIGINT only by kernel rule; make it explicit so no handler of Python's runs here.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        exit_as_the_interpreter_would(lambda: run(config["cpu"], config["preload"] or []))
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


def run(cpu_seconds, preload):
    # Keep the result channel away from anything the script starts.
    os.set_inheritable(RESULT_FD, False)
    # Everything the harness itself needs is imported before it reports ready, so a warm jail does none of it on
    # the script's time.
    import ctypes
    import linecache
    import traceback
    import types

    for name in preload:
        __import__(name)
    write_all(RESULT_FD, b"S")

    chunks = []
    while True:
        chunk = os.read(SCRIPT_FD, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(SCRIPT_FD)
    source = b"".join(chunks)

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
        # stdout is flushed above, before the frame: the server takes what the pipe holds when the frame is in.
        write_all(RESULT_FD, kind + len(payload).to_bytes(8, "big") + payload)
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
