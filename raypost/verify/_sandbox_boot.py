"""Runs inside the sandbox process, before the untrusted program: confine, drop, limit, then run.

Standalone on purpose (stdlib only, copied into the sandbox's working dir): it is started with
`python -I _boot.py CONFIG_JSON` and must not import raypost. Exit codes it owns:
0 program ran to its end, 1 AssertionError (or the program's own exit code), 96 the program ended
with status 0 before its last line ran (sys.exit(0), os._exit(0), ...), 97 any other exception
(SyntaxError included), 98 the sandbox itself could not be set up, 128 + N killed by signal N.

Proof that the program ran to its end (its tests come last, so: that its tests finished). Exit
status 0 proves nothing: the program can call os._exit(0) (or sys.exit(0), quit(), a signal
handler that exits 0, ctypes' exit) before its tests run. So two processes take part:
- the supervisor (this file's first process) never runs a line of the program. It reads the
  parent's per-run token from a pipe into a bytearray and closes the pipe before forking; the
  program's process zeroes its copy of that buffer and closes the report file before the program
  starts, so the token is nowhere the program can look: not in its source, __file__, argv,
  environment, stack frames, memory or open files.
- the program's process writes DONE to a pipe only when `exec` of the whole program returned
  normally. The supervisor writes the token to the report file only when that process exited 0
  *and* DONE came; exit 0 without DONE is exit 96. The parent counts a pass only when the report
  file holds its token and the exit status is 0, so printing a fake token, or writing to the report
  file through /proc, gains nothing.
What this cannot stop (nothing inside one interpreter can): a program written against this file
that writes DONE to the pipe itself. It stops every way of simply ending early.
"""

import ctypes
import json
import os
import resource
import stat
import sys
import traceback

EXIT_EARLY = 96
EXIT_EXCEPTION = 97
EXIT_SETUP = 98
DONE = b"raypost-sandbox-done"

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
_OPTION_FLAGS = {
    "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
}
# Kernel-managed trees that must stay as they are (the new /proc belongs to the sandbox's PID
# namespace; /dev holds /dev/null). None of them is writable by the dropped uid.
_KEEP_WRITABLE = ("/proc", "/sys", "/dev", "/dev/pts")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def _mountinfo():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            yield point, fields[5].split(",")


def _unreachable_ancestor(path):
    """Highest ancestor of `path` that other users cannot traverse (e.g. /root, mode 0700)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def _expose_python(paths):
    """Make the interpreter's install readable for the unprivileged uid without touching the host:
    an empty tmpfs covers the closed ancestor (hiding the rest of it, e.g. /root), and only the
    install itself is bind-mounted back in."""
    for path in sorted(set(paths)):
        ancestor = _unreachable_ancestor(path)
        if ancestor is None:
            continue
        fd = os.open(path, os.O_PATH)
        if not os.path.ismount(ancestor):
            _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        target = os.path.join(ancestor, os.path.relpath(path, ancestor))
        os.makedirs(target, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
        os.close(fd)


def _confine_filesystem(workdir, drop_uid):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if drop_uid:
        _expose_python([os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix),
                        os.path.dirname(os.path.realpath(sys.executable))])
    # The working dir becomes its own mount so it stays writable when everything else goes
    # read-only. MS_BIND in every remount below: without it the kernel would remount the shared
    # superblock, i.e. the host's file system.
    _mount(workdir, workdir, None, MS_BIND | MS_REC)
    for point, options in _mountinfo():
        if point == workdir or point in _KEEP_WRITABLE or point.startswith(("/proc/", "/sys/")):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= _OPTION_FLAGS.get(option, 0)
        try:
            _mount(None, point, None, flags)
        except OSError:
            if point == "/" or workdir.startswith(point.rstrip("/") + "/"):
                raise


def _drop_privileges(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _set_limits(limits):
    def cap(which, value):
        value = int(value)
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value if which != resource.RLIMIT_CPU else value + 1))

    cap(resource.RLIMIT_CPU, limits["cpu_s"])
    cap(resource.RLIMIT_AS, limits["memory_mb"] * 1024 * 1024)
    cap(resource.RLIMIT_FSIZE, limits["file_mb"] * 1024 * 1024)
    cap(resource.RLIMIT_NPROC, limits["nproc"])
    cap(resource.RLIMIT_NOFILE, limits["nofile"])
    cap(resource.RLIMIT_CORE, 0)


def _block_sockets():
    """Preamble network block, used only where no network namespace can be had. Best effort:
    a program can still reach the network through a child process or raw syscalls (ctypes)."""
    import _socket
    import socket

    class _NoNetwork:
        def __new__(cls, *args, **kwargs):
            raise PermissionError(1, "network access is disabled in the raypost sandbox")

    def refuse(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the raypost sandbox")

    socket.socket = socket.SocketType = _socket.socket = _NoNetwork
    socket.create_connection = socket.create_server = socket.fromfd = refuse
    socket.socketpair = _socket.socketpair = refuse


def _run_program(config, done_fd):
    try:
        _set_limits(config["limits"])
        if config["mode"] != "namespaces":
            _block_sockets()
    except Exception:
        traceback.print_exc()
        sys.stderr.write("raypost sandbox: setup failed\n")
        sys.stderr.flush()
        os._exit(EXIT_SETUP)
    sys.dont_write_bytecode = True
    sys.argv = ["main.py"]
    sys.path[0] = config["workdir"]
    with open("main.py", encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
    # Bound now: the program may replace os.write or os._exit before the report is sent.
    write, exit_now = os.write, os._exit
    try:
        exec(compile(source, "main.py", "exec"), namespace)
    except SystemExit:
        raise  # exit 0 now is "ended early" (no DONE sent), another status is the program's own
    except AssertionError:
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        exit_now(1)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        exit_now(EXIT_EXCEPTION)
    write(done_fd, DONE)


def _read_available(fd):
    os.set_blocking(fd, False)  # a background child of the program may still hold the write end
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""


def main():
    config = json.loads(sys.argv[1])
    try:
        if config["mode"] == "namespaces":
            _confine_filesystem(config["workdir"], drop_uid=config["uid"] is not None)
        if config["uid"] is not None:
            _drop_privileges(config["uid"])
        os.chdir(config["workdir"])
    except Exception:
        traceback.print_exc()
        sys.stderr.write("raypost sandbox: setup failed\n")
        sys.stderr.flush()
        os._exit(EXIT_SETUP)
    # A small supervisor waits for the program and reports a death by signal (SIGXCPU from the CPU
    # limit, SIGKILL) as 128 + signal, the shell's convention: `unshare --fork` cannot always
    # re-raise its child's signal, and as the PID namespace's first process the supervisor takes
    # every leftover process down with it when it exits. It alone holds the token (module docstring).
    token = bytearray(config["token_bytes"])
    if os.readv(config["token_fd"], [token]) != len(token):
        sys.stderr.write("raypost sandbox: setup failed (no token)\n")
        os._exit(EXIT_SETUP)
    os.close(config["token_fd"])
    done_read, done_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        token[:] = bytes(len(token))
        os.close(config["report_fd"])
        os.close(done_read)
        _run_program(config, done_write)
        return
    os.close(done_write)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    code = os.WEXITSTATUS(status)
    if code == 0:
        if _read_available(done_read) != DONE:
            sys.stderr.write("raypost sandbox: exited before its tests finished\n")
            sys.stderr.flush()
            os._exit(EXIT_EARLY)
        os.write(config["report_fd"], token)
    os._exit(code)


if __name__ == "__main__":
    main()
