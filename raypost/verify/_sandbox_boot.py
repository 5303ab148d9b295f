"""Runs inside the sandbox process, before the untrusted program: confine, drop, limit, then run.

Standalone on purpose (stdlib only, copied into the sandbox's working dir): it is started with
`python -I _boot.py CONFIG_JSON` and must not import raypost. Exit codes it owns:
0 program finished, 1 AssertionError (or the program's own exit code), 97 any other exception
(SyntaxError included), 98 the sandbox itself could not be set up, 128 + N killed by signal N.
"""

import ctypes
import json
import os
import resource
import stat
import sys
import traceback

EXIT_EXCEPTION = 97
EXIT_SETUP = 98

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


def _run_program(config):
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
    try:
        exec(compile(source, "main.py", "exec"), namespace)
    except SystemExit:
        raise
    except AssertionError:
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_EXCEPTION)


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
    # every leftover process down with it when it exits.
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        _run_program(config)
        return
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
