# The fork server: a long-lived jail that imports a preload set (nothing; numpy; numpy and pandas) once and then
# forks one child per request. nsjail makes it from the same definition as a cold jail (internal/jaildef says
# what differs, and why); it is embedded in the Go binary like the harness and mounted at /safepy/forkserver.py.
#
# It runs no script and never receives request data: on its control socket (descriptor 3) it receives, per
# request, only the request's descriptors (stdout, stderr, script, result, status, and the request's cgroup.procs,
# opened by the server) and the uid to run as. Its child builds the request's jail around itself before the script
# arrives, from the plan the Go side derived from nsjail.cfg (argv[1]):
#   1. it moves itself into the request's cgroup (writing 0 to a cgroup.procs the server opened: the kernel checks
#      the opener's credentials), puts the request's descriptors at fixed numbers and closes every other one, the
#      control socket included;
#   2. it becomes the request's uid and unshares user, mount, network, IPC, UTS, cgroup, PID and time namespaces,
#      mapping only its own uid (1000 inside), and starts the time namespace's clocks at zero;
#   3. it forks the request's PID 1 and stays behind as a supervisor that reports PID 1's wait status on the status
#      pipe, as nsjail reports its child's;
#   4. PID 1 mounts a fresh /proc (with the plan's fixed texts over the files that tell of neighbours) and fresh
#      tmpfs /sandbox, /tmp and /dev/shm, sets the hostname, the working directory and every rlimit, drops every
#      capability, sets no_new_privs, installs the cold jail's own seccomp filter (the very BPF program nsjail built
#      from nsjail.cfg, read from a cold jail at start-up), reseeds what the fork server seeded, and is from then on
#      exactly a cold jail's harness.
import ctypes
import gc
import importlib.util
import json
import os
import signal
import socket
import sys
import time

CTL_FD = 3
libc = ctypes.CDLL(None, use_errno=True)

PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 0x4000, 1 << 18
CLONE_NEWTIME, CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x80, 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
SYS_CAPSET = 126
with open("/proc/sys/kernel/cap_last_cap") as f:
    LAST_CAP = int(f.read())


class SetupError(Exception):
    pass


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError("%s: %s" % (what, os.strerror(err)))


def load_harness():
    spec = importlib.util.spec_from_file_location("safepy_harness", "/safepy/harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(config):
    harness = load_harness()
    harness.prepare_matplotlib()  # in the fork server's own small /tmp; each child has a fresh one
    for name in config["preload"]:
        __import__(name)
    # What the child's setup and the harness's run() import, imported here once.
    import atexit, base64, hashlib, linecache, random, stat, tempfile, threading, traceback, types  # noqa: F401,E401

    # And what the child's reseed() uses: numpy loads numpy.random on first use, which would otherwise cost every
    # child of the numpy fork server an import (15 ms of CPU here). The children reseed all the same.
    reseed()

    if len(os.listdir("/proc/self/task")) != 1:
        # unshare(CLONE_NEWUSER) is refused to a multithreaded process, and a fork would copy one thread only.
        sys.stderr.write("fork server: the preload started threads; refusing to serve\n")
        os._exit(3)
    # A typical script of the preload set, once, here: what its first run sets up lazily (modules imported on first
    # use, caches of fonts and formats) is then the fork server's, shared by every child instead of redone in each.
    # It is trusted code with nothing of a request; what it prints goes nowhere.
    training = TRAINING.get(config["preload"][-1] if config["preload"] else "", TRAINING[""])
    stdout = os.dup(1)
    devnull = os.open("/dev/null", os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        harness.exercise(training)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
        os.close(devnull)
    gc.collect()
    gc.freeze()  # the children share these objects' pages instead of copying them as the collector touches them
    prefault = train(harness, training)
    # Not dumpable: no process of the fork server's user can read its memory or open its /proc files.
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children: no zombies
    ctl = socket.socket(fileno=CTL_FD)
    # Ready, how much a warm child prefaults, and how much of the fork server's memory the typical script copied:
    # the server adds these to a child's memory limit (jail.go, forkedMemoryLimit), since such copies are charged to
    # the child on top of what the fork server holds.
    ctl.send(b"R" + json.dumps({"prefault_bytes": sum(length for _, length in prefault["write"]),
                                "copied_bytes": prefault["copied"]}).encode())
    plan = config["plan"]
    while True:
        try:
            msg, fds, flags, _ = socket.recv_fds(ctl, 4096, 16)
        except InterruptedError:
            continue
        if not msg:
            os._exit(0)  # the server closed the socket: retire
        if flags & socket.MSG_CTRUNC or len(fds) < 5:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                req = json.loads(msg)
                child(req, fds, plan, harness, prefault if req.get("prefault") else None)
            except BaseException as exc:
                try:
                    os.write(2, ("fork server child: %s\n" % exc).encode())
                finally:
                    os._exit(70)
        for fd in fds:
            os.close(fd)


# What a typical script of each preload set does, run once by a training child of the fork server (trusted code,
# no request's). The pages it writes are the ones a request's process would copy from the fork server on first
# write, and the code it runs is what a request's process would fault in again; a warm jail does both ahead of time
# (prefaults them), so that a request does not wait on it.
TRAINING = {
    "": "def main():\n    print('hello')\n    return {'ok': True}\n",
    "numpy": "import numpy as np\ndef main():\n    print(np.arange(3))\n    return {'sum': int(np.sum([1, 2, 3]))}\n",
    "pandas": "import os, pandas as pd\ndef main():\n    print(sorted(os.listdir('/'))[:5])\n"
              "    return {'rows': int(pd.DataFrame({'a': [1, 2, 3]}).shape[0])}\n",
    "matplotlib.pyplot": "import io, pandas as pd, matplotlib.pyplot as plt\ndef main():\n"
                         "    df = pd.read_csv(io.StringIO('x,y\\n1,2\\n2,4\\n3,1\\n'))\n"
                         "    fig, ax = plt.subplots()\n    df.plot(x='x', y='y', ax=ax)\n"
                         "    buf = io.BytesIO()\n    fig.savefig(buf, format='png')\n    plt.close(fig)\n"
                         "    return len(buf.getvalue())\n",
}


def train(harness, training):
    """Run the preload set's typical script in a child and return what it touched: the address ranges it wrote to
    ("write") and the pages of the libraries' code and read-only data it read ("read"); and how many bytes of the
    fork server's own pages it copied by writing them ("copied").

    The copies are what a jail of this preload set pays twice for: a page of the fork server's that a script
    writes is copied, the copy is charged to the jail, and the original stays charged to the fork server, which
    the jail's limit already leaves out. A cold jail holds that page once. So every child's limit is raised by what
    the typical script copies (measured here, on this fork server's own memory), and its script has what a cold
    jail's would (jail.go, forkedMemoryLimit)."""
    import array
    import bisect

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            devnull = os.open("/dev/null", os.O_WRONLY)
            os.dup2(devnull, 1)
            page = os.sysconf("SC_PAGE_SIZE")
            # The fork server's pages as the script finds them: in the writable private mappings, those present and
            # not yet this process's alone are the fork server's, shared. (What this bookkeeping allocates may
            # copy a few pages of them itself, which counts them too: an overestimate by a few pages at most.)
            shared = []  # (start, end, pagemap entries), by start
            with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
                for line in maps:
                    fields = line.split()
                    if fields[1] == "rw-p":
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        pagemap.seek(lo // page * 8)
                        entries = array.array("Q")
                        entries.frombytes(pagemap.read((hi - lo) // page * 8))
                        shared.append((lo, hi, entries))
            starts = [lo for lo, _, _ in shared]

            def was_shared(address):
                k = bisect.bisect_right(starts, address) - 1
                if k < 0 or address >= shared[k][1]:
                    return False  # mapped since
                e = shared[k][2][(address - shared[k][0]) // page]
                return e >> 63 & 1 and not e >> 56 & 1

            harness.exercise(training)
            touched = {"write": [], "read": [], "copied": 0}
            with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
                for line in maps:
                    fields = line.split()
                    if fields[1] == "rw-p":
                        # Written since the fork: present, and this process's alone.
                        kind, wanted = "write", lambda e: e >> 63 & 1 and e >> 56 & 1
                    elif fields[1] in ("r-xp", "r--p") and len(fields) > 5 and fields[5].startswith("/"):
                        # A fork does not copy the page tables of a file's read-only mapping: each child faults
                        # in again every page of code it runs. Present here: the training ran it.
                        kind, wanted = "read", lambda e: e >> 63 & 1
                    else:
                        continue
                    ranges = touched[kind]
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    pagemap.seek(lo // page * 8)
                    entries = array.array("Q")
                    entries.frombytes(pagemap.read((hi - lo) // page * 8))
                    for i, e in enumerate(entries):
                        if wanted(e):
                            start = lo + i * page
                            if kind == "write" and was_shared(start):
                                touched["copied"] += page  # the fork server's, shared before the script, now a copy
                            # Pages close enough in one mapping make one call; for writes only adjacent ones: a
                            # page between them would be copied for nothing (and charged to the jail), and tens of
                            # MiB of them for a plot's jail.
                            gap = 0 if kind == "write" else 16 * page
                            if ranges and lo <= ranges[-1][0] and start - (ranges[-1][0] + ranges[-1][1]) <= gap:
                                ranges[-1][1] = start + page - ranges[-1][0]
                            else:
                                ranges.append([start, page])
            os.write(w, json.dumps(touched).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return {"write": [], "read": [], "copied": 0}


def child(req, fds, plan, harness, prefault):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, procs = fds[:5], fds[5:]
    for fd in procs:
        os.write(fd, b"0")  # into the request's cgroup, before anything else happens
        os.close(fd)
    # Descriptors: 0 /dev/null, 1 stdout, 2 stderr, 3 script, 4 result, 5 status; nothing else, the control socket
    # least of all. Moved high first, so that no target number is one still to be moved.
    high = [os.dup(fd) for fd in request]
    for fd in request:
        os.close(fd)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    for target, fd in enumerate(high, start=1):
        os.dup2(fd, target)
    os.closerange(6, os.sysconf("SC_OPEN_MAX"))

    uid = req["uid"]
    os.setresgid(plan["gid"], plan["gid"], plan["gid"])
    os.setresuid(uid, uid, uid)
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP | CLONE_NEWPID
    if plan["time_namespace"]:
        flags |= CLONE_NEWTIME
        own_offsets = time_offsets()
    check(libc.unshare(flags), "unshare")
    # The fork server is not dumpable, which leaves /proc/self's files to root; a request's own process is, as a
    # cold jail's is. (Only now: a change of uid resets the flag.)
    check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (plan["uid"], uid)),
                       ("/proc/self/gid_map", "%d %d 1" % (plan["gid"], plan["gid"]))):
        with open(path, "w") as f:
            f.write(text)
    if plan["time_namespace"]:
        # The jail's monotonic and boot-time clocks start now (sandbox/clocks.go says why here): the offsets are
        # set before PID 1, the first process in the namespace, is forked. They are from the host's clocks: what
        # this process reads, less the offsets of the namespace it is in. The kernel wants them as whole seconds
        # down and nanoseconds in [0, 1e9), which divmod of the negated time gives.
        offsets = "".join("%s %d %d\n" % ((name,) + divmod(-(time.clock_gettime_ns(clock) - own_offsets[name]), 10 ** 9))
                          for name, clock in (("monotonic", time.CLOCK_MONOTONIC), ("boottime", time.CLOCK_BOOTTIME)))
        with open("/proc/self/timens_offsets", "w") as f:
            f.write(offsets)

    # A session and process group of its own, as nsjail gives a cold jail: kill(0, ...) from the script reaches
    # its own jail, never the supervisor, the fork server or a sibling.
    os.setsid()
    pid1 = os.fork()
    if pid1 == 0:
        os.setsid()
        os.close(5)
        build_jail(plan)
        harness.set_rlimits(plan["rlimits"])
        drop_privileges(plan["seccomp"])
        reseed()
        sys.argv = ["/safepy/harness.py", json.dumps(plan["harness"])]
        harness.init(dict(plan["harness"], prefault=prefault))
        os._exit(72)  # init never returns
    for fd in range(5):
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(pid1, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    # PID 1 reports how the script ended in its exit status (128 + a signal that ended the script); PID 1 itself
    # ended by a signal (the init of a PID namespace takes none from inside it: from the host, or the OOM killer)
    # is told apart, as 256 + the signal, as nsjail's log tells it apart for a cold jail.
    code = 256 - code if code < 0 else code
    os.write(5, code.to_bytes(4, "big"))
    os._exit(0)


def time_offsets():
    """The offsets of this process's time namespace from the host's clocks, in nanoseconds, by clock name."""
    names = {"1": "monotonic", "7": "boottime", "monotonic": "monotonic", "boottime": "boottime"}
    with open("/proc/self/timens_offsets") as f:
        return {names[clock]: int(sec) * 10 ** 9 + int(nsec) for clock, sec, nsec in (line.split() for line in f)}


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    return libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data))


def build_jail(plan):
    check(mount(None, "/", None, MS_REC | MS_PRIVATE), "making mounts private")
    for m in plan["mounts"]:
        ro = 0 if m["rw"] else MS_RDONLY
        kind, dst = m["kind"], m["dst"]
        if kind == "proc":
            r = mount("proc", dst, "proc", ro)
        elif kind == "tmpfs":
            r = mount("tmpfs", dst, "tmpfs", ro, m["options"])
        else:  # a fixed text over a file; read-only, as the mount it is bound from
            r = mount(m["src"], dst, None, MS_BIND)
        if r != 0 and m["mandatory"]:
            check(r, "mounting %s" % dst)
    check(libc.sethostname(plan["hostname"].encode(), len(plan["hostname"])), "sethostname")
    os.chdir(plan["cwd"])


def drop_privileges(seccomp_hex):
    for cap in range(LAST_CAP + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "dropping capability %d" % cap)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    check(libc.syscall(SYS_CAPSET, ctypes.byref(Header(0x20080522, 0)), data), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = bytes.fromhex(seccomp_hex)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = Fprog(len(program) // 8, ctypes.addressof(buf))
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "installing the seccomp filter")


def reseed():
    """What the fork server seeded at import is shared by every child until reseeded here. random reseeds itself at
    fork; numpy's legacy global generator does not; tempfile keeps a generator of names; multiprocessing keeps an
    authentication key."""
    import random

    random.seed()
    m = sys.modules
    if "numpy" in m:
        np = m["numpy"]
        # 256 bits from the kernel, as seed() with no argument draws, without its SeedSequence (a third of a
        # millisecond per request here).
        np.random.seed(np.frombuffer(os.urandom(32), dtype=np.uint32))
    if "tempfile" in m:
        m["tempfile"]._name_sequence = None
    if "multiprocessing.process" in m:
        m["multiprocessing.process"].current_process().authkey = os.urandom(32)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
