"""The sandbox against hostile programs: each is contained and leaves nothing behind."""

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from raypost.verify import isolation_mode, run_many, run_python

REPO = Path(__file__).resolve().parents[1]


def _procs_matching(needle: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(needle in c for c in p.info["cmdline"] or []):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _assert_nothing_left(result, marker: str | None = None, deadline_s: float = 5.0):
    assert result.workdir and not os.path.exists(result.workdir), "temp working dir not removed"
    needles = [result.workdir] + ([marker] if marker else [])
    end = time.monotonic() + deadline_s
    while True:  # the kernel tears a dead PID namespace down asynchronously
        left = [p for n in needles for p in _procs_matching(n)]
        if not left or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert not left, f"stray processes: {[p.info['cmdline'] for p in left]}"


@pytest.mark.parametrize(
    "code, status",
    [
        ("print('hi')", "pass"),
        ("assert 1 + 1 == 3, 'wrong'", "fail"),
        ("import sys; sys.exit(2)", "fail"),
        ("def f(:\n  pass", "error"),
        ("undefined_name + 1", "error"),
        ("raise ValueError('boom')", "error"),
        ("import time; time.sleep(30)", "timeout"),
    ],
)
def test_classification(code, status):
    result = run_python(code, timeout_s=2)
    assert result.status == status, result
    if status == "fail" and "assert" in code:
        assert "AssertionError: wrong" in result.stderr
    if status == "pass":
        assert result.stdout == "hi\n" and result.returncode == 0
    _assert_nothing_left(result)


# Each ends with status 0 before the assert after it runs: a reward hack for a model whose code is
# verified by exit status. None may pass (the HumanEval harness counts these as failures too).
EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "sys.exit()": "import sys\nsys.exit()",
    "raise SystemExit": "raise SystemExit",
    "raise SystemExit(0) in a test call": "def f():\n    raise SystemExit(0)\nassert f() == 1",
    "quit()": "quit()",
    "exit()": "exit()",
    "os._exit(0)": "import os\nos._exit(0)",
    "libc _exit(0)": "import ctypes\nctypes.CDLL(None)._exit(0)",
    "SIGTERM handler exits 0": ("import os, signal\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
                                "os.kill(os.getpid(), signal.SIGTERM)"),
    "atexit exits 0 after a failure": "import atexit, os\natexit.register(os._exit, 0)\nassert False",
    "excepthook exits 0": "import os, sys, traceback\ntraceback.print_exc = lambda *a, **k: os._exit(0)",
    "os.write and os._exit replaced": "import os\nos.write = lambda *a: 0\nos._exit(0)",
    "thread exits 0 while the tests run": ("import os, threading, time\n"
                                           "threading.Thread(target=lambda: os._exit(0)).start()\n"
                                           "time.sleep(3)"),
}


@pytest.mark.parametrize("name", list(EARLY_EXITS))
def test_early_exit_with_status_0_fails(name):
    result = run_python(EARLY_EXITS[name] + "\nassert False, 'the tests ran'\n", timeout_s=5)
    assert result.status == "fail", result
    if name != "atexit exits 0 after a failure":  # that one fails its assert before exiting
        assert result.early_exit and result.detail == "exited before its tests finished", result
    _assert_nothing_left(result)


def test_self_kill_is_not_a_pass():
    result = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\nassert False", timeout_s=5)
    assert result.status == "error" and not result.early_exit, result


def test_program_cannot_forge_the_finished_token():
    """It reads its own source, every frame's locals and constants and every object the garbage
    collector knows, prints each token-sized candidate and writes it to every file descriptor it can
    reach (its own, and its supervisor's through /proc), then exits 0."""
    code = (
        "import gc, glob, os, sys\n"
        "cands = [open(__file__, 'rb').read()]\n"
        "f = sys._getframe()\n"
        "while f:\n"
        "    cands += [v for v in f.f_locals.values() if isinstance(v, (bytes, bytearray, str))]\n"
        "    cands += [c for c in f.f_code.co_consts if isinstance(c, (bytes, str))]\n"
        "    f = f.f_back\n"
        "cands += [o for o in gc.get_objects() if isinstance(o, (bytes, bytearray))]\n"
        "cands = [bytes(c, 'latin-1') if isinstance(c, str) else bytes(c) for c in cands]\n"
        "cands = [c for c in cands if len(c) == 32 and any(c)]\n"
        "fds = list(range(3, 64))\n"
        "for path in glob.glob('/proc/*/fd/*'):\n"
        "    try:\n"
        "        fds.append(os.open(path, os.O_WRONLY))\n"
        "    except OSError:\n"
        "        pass\n"
        "for c in cands:\n"
        "    print(c.hex())\n"
        "    sys.stdout.buffer.write(c + b'\\n')\n"
        "    for fd in fds:\n"
        "        try:\n"
        "            os.write(fd, c)\n"
        "        except OSError:\n"
        "            pass\n"
        "sys.stdout.flush()\n"
        "os._exit(0)\n"
        "assert False\n"
    )
    for isolation in ("namespaces", "preamble") if isolation_mode() == "namespaces" else ("preamble",):
        result = run_python(code, timeout_s=10, isolation=isolation)
        assert result.status == "fail" and result.early_exit, (isolation, result)


def test_cpu_limit_is_a_timeout():
    result = run_python("while True: pass", timeout_s=20, cpu_s=1)
    assert result.status == "timeout" and result.seconds < 10, result


def test_infinite_loop_killed_on_wall_clock():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1.5)
    assert result.status == "timeout"
    assert time.monotonic() - start < 10
    _assert_nothing_left(result)


def test_fork_bomb_contained():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(code, timeout_s=3, nproc=32)
    assert result.status in ("timeout", "error"), result
    _assert_nothing_left(result)
    assert run_python("print(6 * 7)").stdout == "42\n"  # the machine still runs new programs


def test_huge_allocation_contained():
    result = run_python("x = bytearray(8 * 1024**3)\nprint('allocated')", memory_mb=256, timeout_s=10)
    assert result.status == "error" and "MemoryError" in result.stderr
    assert "allocated" not in result.stdout
    grow = run_python("x = []\nwhile True:\n    x.append(b' ' * 10**7)", memory_mb=256, timeout_s=10)
    assert grow.status == "error" and "MemoryError" in grow.stderr
    _assert_nothing_left(grow)


def test_os_system_and_background_children_contained(tmp_path):
    marker = f"raypost-marker-{uuid.uuid4().hex}"
    outside = Path("/tmp") / marker
    code = (
        "import os, subprocess\n"
        f"os.system('touch {outside}')\n"
        f"os.system(\"nohup sh -c 'sleep 600; echo {marker}' >/dev/null 2>&1 &\")\n"
        f"subprocess.Popen(['sh', '-c', 'sleep 600; echo {marker}'], start_new_session=True)\n"
        "print('spawned')\n"
    )
    result = run_python(code, timeout_s=5)
    assert result.stdout.strip() == "spawned"
    assert not outside.exists()
    _assert_nothing_left(result, marker)


def test_network_blocked_loopback_and_outside():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    code = (
        "import socket\n"
        f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)]:\n"
        "    try:\n"
        "        s = socket.create_connection(addr, timeout=2)\n"
        "        s.sendall(b'leak')\n"
        "        print('CONNECTED', addr)\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', addr, e)\n"
    )
    try:
        result = run_python(code, timeout_s=15)
    finally:
        stop.set()
        thread.join(2)
        server.close()
    assert "CONNECTED" not in result.stdout, result.stdout
    assert result.stdout.count("BLOCKED") == 3, result
    assert accepted == []
    _assert_nothing_left(result)


def test_writes_outside_workdir_fail_and_leave_nothing():
    name = f"raypost-escape-{uuid.uuid4().hex}"
    targets = [Path("/tmp") / name, REPO / name, REPO / "tests" / name, Path("/var/tmp") / name,
               Path("/dev/shm") / name]
    code = (
        "import os\n"
        f"for path in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('DENIED', path, type(e).__name__)\n"
        "open('inside.txt', 'w').write('ok')\n"
        "print('INSIDE', open('inside.txt').read())\n"
    )
    result = run_python(code, timeout_s=5)
    assert result.status == "pass", result
    assert "INSIDE ok" in result.stdout
    if isolation_mode() == "namespaces":
        assert "WROTE" not in result.stdout, result.stdout
    for target in targets:
        assert not target.exists(), f"{target} left behind"
    _assert_nothing_left(result)


def test_caller_environment_invisible(monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("RAYPOST_TEST_SECRET", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    code = (
        "import os, glob\n"
        "print(dict(os.environ))\n"
        "for path in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        print(open(path, 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
        f"try:\n    print(open('/proc/{os.getpid()}/environ', 'rb').read())\nexcept OSError as e:\n    print(e)\n"
    )
    result = run_python(code, timeout_s=5)
    assert result.status == "pass", result
    assert secret not in result.stdout and secret not in result.stderr
    assert "RAYPOST_TEST_SECRET" not in result.stdout


def test_preamble_mode_catches_early_exits():
    for code in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"):
        result = run_python(code, timeout_s=5, isolation="preamble")
        assert result.status == "fail" and result.detail == "exited before its tests finished", result
    assert run_python("print('ok')", timeout_s=5, isolation="preamble").status == "pass"


def test_preamble_mode_blocks_sockets_and_cleans_up():
    """The fallback used where no namespaces can be had: sockets refused by the preamble."""
    marker = f"raypost-marker-{uuid.uuid4().hex}"
    code = (
        "import socket, subprocess\n"
        f"subprocess.Popen(['sh', '-c', 'sleep 600; echo {marker}'], start_new_session=True)\n"
        "try:\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\nexcept OSError as e:\n"
        "    print('BLOCKED', e)\n"
    )
    result = run_python(code, timeout_s=5, isolation="preamble")
    assert result.status == "pass", result
    assert "BLOCKED" in result.stdout and "disabled" in result.stdout
    _assert_nothing_left(result, marker)


def test_run_many_keeps_order():
    results = run_many([f"print({i})" for i in range(5)] + ["assert False"], max_workers=2, timeout_s=5)
    assert [r.stdout.strip() for r in results[:5]] == ["0", "1", "2", "3", "4"]
    assert results[5].status == "fail"
