"""Run untrusted Python (model-written code plus its tests) in a contained child process.

Isolation, strongest first, chosen once per process (`isolation_mode()`):
- "namespaces" (Linux `unshare`, as root or with unprivileged user namespaces): new network
  namespace (no interface is up: no 127.0.0.1, no outside), new PID namespace (the program cannot
  see or signal the caller's processes, and everything in it dies with its first process), new
  mount namespace with every file system remounted read-only except the temp working dir, and a
  fresh /proc. As root the program also runs under a fresh unused uid, so it owns nothing of the
  caller's and RLIMIT_NPROC (which root ignores) applies.
- "preamble" (no usable `unshare`): socket creation replaced before the program runs, rlimits,
  its own session. Best effort only: see docs/verify.md.
Both: `python -I`, an empty environment (no caller variables), a fresh temp working dir removed
afterwards, rlimits on CPU time, address space, file size, processes and open files, and a
wall-clock timeout that kills the whole process group.

A program passes only when it ran to its last line: exit status 0 is not enough (sys.exit(0) or
os._exit(0) before the tests would give it). The sandbox's supervisor hands back a per-run token
that the program never sees, only after the program's last line ran; how, and what that cannot
stop, is in _sandbox_boot.py's docstring.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Sequence

SandboxStatus = Literal["pass", "fail", "timeout", "error"]

_BOOT = Path(__file__).with_name("_sandbox_boot.py")
_EXIT_EARLY = 96
_EXIT_EXCEPTION = 97
_EXIT_SETUP = 98
_TOKEN_BYTES = 32
EARLY_EXIT_REASON = "exited before its tests finished"
_OUTPUT_LIMIT = 64 * 1024
_UNSHARE_FLAGS = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
# Threaded math libraries would each try to start a thread per core and hit RLIMIT_NPROC.
_MARKER_VAR = "RAYPOST_SANDBOX"
_SANDBOX_ENV_EXTRA = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: SandboxStatus
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: str = ""
    workdir: str = ""  # already removed; kept so callers and tests can check nothing is left
    early_exit: bool = False  # status 0 (or the harness's exit 96) before the program's end

    @property
    def detail(self) -> str:
        """One short line saying why: the last line of stderr, or the exit code."""
        if self.status == "pass":
            return "pass"
        if self.status == "timeout":
            return "timeout"
        if self.early_exit:
            return EARLY_EXIT_REASON
        lines = [ln.strip() for ln in self.stderr.strip().splitlines() if ln.strip()]
        return (lines[-1] if lines else f"exit code {self.returncode}")[:200]


def _unshare_command() -> list[str] | None:
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None)
    if unshare is None:
        return None
    command = [unshare, *_UNSHARE_FLAGS]
    if os.geteuid() != 0:
        command.insert(1, "--map-root-user")
    return command


@functools.lru_cache(maxsize=1)
def isolation_mode() -> str:
    """ "namespaces" when `unshare` works here, else "preamble". RAYPOST_SANDBOX_ISOLATION forces one."""
    forced = os.environ.get("RAYPOST_SANDBOX_ISOLATION")
    if forced in ("namespaces", "preamble"):
        return forced
    command = _unshare_command()
    if command is None or not sys.platform.startswith("linux"):
        return "preamble"
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "preamble"
    return "namespaces" if probe.returncode == 0 else "preamble"


def _python_reachable_by_others() -> bool:
    """Without a mount namespace a dropped uid must be able to read the interpreter as it is."""
    for path in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            if not os.stat("/" + "/".join(parts[:i])).st_mode & 0o001:
                return False
    return True


def _sandbox_uid(mode: str) -> int | None:
    if os.geteuid() != 0:
        return None
    if mode == "preamble" and not _python_reachable_by_others():
        return None
    # A fresh uid nobody uses: owns no file, and RLIMIT_NPROC counts only this sandbox.
    return 200_000 + secrets.randbelow(1_000_000_000)


def _read_tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - _OUTPUT_LIMIT))
    return f.read().decode("utf-8", errors="replace")


def _kill_tree(proc: subprocess.Popen, uid: int | None, marker: str) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    # Whatever left the process group (setsid, daemonizing) is found by the sandbox's private uid
    # or by the marker every sandbox process inherits in its environment. Needed in "preamble"
    # mode only: in "namespaces" mode the PID namespace dies with its first process.
    import psutil

    needle = f"{_MARKER_VAR}={marker}".encode()
    for p in psutil.process_iter(["uids"]):
        try:
            if (uid is not None and p.info["uids"] and p.info["uids"].real == uid) or _has_marker(p.pid, needle):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _has_marker(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return needle in f.read()
    except OSError:
        return False


def _classify(returncode: int, timed_out: bool, finished: bool) -> SandboxStatus:
    if timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout"
    if returncode == 0:
        return "pass" if finished else "fail"
    if returncode in (_EXIT_EXCEPTION, _EXIT_SETUP) or returncode < 0 or returncode >= 128:
        return "error"
    return "fail"


def run_python(
    code: str,
    *,
    timeout_s: float = 10,
    memory_mb: int = 512,
    cpu_s: float | None = None,
    nproc: int = 64,
    nofile: int = 64,
    file_mb: int = 16,
    isolation: str | None = None,
) -> SandboxResult:
    """Run `code` as a Python program in a fresh sandbox and classify the outcome.

    pass: the program ran to its last line and exited 0. fail: AssertionError, a nonzero exit the
    program chose (sys.exit), or an exit with status 0 before its last line ran (`early_exit`,
    reason EARLY_EXIT_REASON: sys.exit(0), os._exit(0), quit(), ...). error: any
    other exception (SyntaxError, NameError, MemoryError, ...) or death by a signal. timeout: wall
    clock `timeout_s` or CPU time `cpu_s` (default: timeout_s) ran out.
    """
    mode = isolation or isolation_mode()
    if mode == "namespaces" and _unshare_command() is None:
        raise RuntimeError("isolation='namespaces' needs the unshare tool (util-linux)")
    uid = _sandbox_uid(mode)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="raypost-sandbox-"))
    marker = secrets.token_hex(8)
    token = secrets.token_bytes(_TOKEN_BYTES)
    start = time.monotonic()
    token_read = -1
    try:
        Path(workdir, "main.py").write_text(code, encoding="utf-8")
        shutil.copyfile(_BOOT, Path(workdir, "_boot.py"))
        if uid is not None:
            for path in (workdir, *(os.path.join(workdir, n) for n in ("main.py", "_boot.py"))):
                os.chown(path, uid, uid)
        config = {
            "workdir": workdir,
            "mode": mode,
            "uid": uid,
            "token_bytes": _TOKEN_BYTES,
            "limits": {
                "cpu_s": max(1, int(cpu_s if cpu_s is not None else timeout_s + 1)),
                "memory_mb": memory_mb,
                "file_mb": file_mb,
                "nproc": nproc,
                "nofile": nofile,
            },
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", _MARKER_VAR: marker, **_SANDBOX_ENV_EXTRA}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as report:
            # The token goes in by a pipe the supervisor empties and closes before the program
            # starts (never argv, environment or a file); it comes back in `report`.
            token_read, token_write = os.pipe()
            os.write(token_write, token)
            os.close(token_write)
            config.update(token_fd=token_read, report_fd=report.fileno())
            python = [sys.executable, "-I", os.path.join(workdir, "_boot.py"), json.dumps(config)]
            command = [*_unshare_command(), *python] if mode == "namespaces" else python
            # Files, not pipes: a background child holding a pipe open cannot make us wait.
            proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, close_fds=True,
                                    pass_fds=(token_read, report.fileno()))
            os.close(token_read)
            token_read = -1
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_tree(proc, uid, marker)
                proc.wait()
            stdout, stderr = _read_tail(out), _read_tail(err)
            report.seek(0)
            finished = secrets.compare_digest(report.read(_TOKEN_BYTES + 1), token)
        status = _classify(proc.returncode, timed_out, finished)
        return SandboxResult(
            status=status,
            returncode=proc.returncode,
            stdout=stdout,
            stderr=stderr,
            seconds=time.monotonic() - start,
            isolation=mode,
            workdir=workdir,
            early_exit=status == "fail" and proc.returncode in (0, _EXIT_EARLY),
        )
    finally:
        if token_read >= 0:
            os.close(token_read)
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(programs: Sequence[str], max_workers: int = 2, **kwargs) -> list[SandboxResult]:
    """Run each program in its own sandbox, `max_workers` at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return list(pool.map(functools.partial(run_python, **kwargs), programs))
