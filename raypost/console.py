"""What the terminal shows: raypost's own lines, its progress bars and the final tables.

Everything else (Ray, vLLM, Transformers, TRL, warnings of libraries, C++ logs) is written by
libraries and child processes straight to file descriptors 1 and 2, so the quiet console works
at that level: `quiet(log)` points both descriptors at `<output_dir>/logs/driver.log` and keeps
a duplicate of the real terminal for `say` and `progress`. Ray forwards worker output to the
driver, so the log holds the workers' lines too. `--verbose` leaves the descriptors alone.

Workers cannot reach the driver's terminal; they print a tagged line (`worker_say`,
`worker_progress`) and the driver, which receives every worker line from Ray, shows the tagged
ones (`attach_ray`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

TAG = "[raypost] "
PROGRESS_TAG = "[raypost:progress] "
# without a terminal (CI, `| tee`, a job log) a bar prints at these fractions only, or (when
# its total is not known) once a minute
PLAIN_STEPS = (0.25, 0.5, 0.75, 1.0)
PLAIN_INTERVAL_S = 60.0


class _State:
    terminal: TextIO | None = None        # the real terminal while quiet, else None
    log_path: Path | None = None
    bar_open = False                      # a progress line is on screen, not yet ended
    last_drawn: dict[str, float] = {}
    plain_done: dict[str, int] = {}
    last_done: dict[str, int] = {}


def quiet_now() -> bool:
    return _State.terminal is not None


def _out() -> TextIO:
    return _State.terminal if _State.terminal is not None else sys.stdout


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _end_bar() -> None:
    if _State.bar_open:
        _out().write("\n")
        _State.bar_open = False


def say(text: str) -> None:
    """A line for the person at the terminal (and, while quiet, for the log as well)."""
    _end_bar()
    out = _out()
    out.write(text.rstrip("\n") + "\n")
    out.flush()
    if quiet_now():
        print(text, flush=True)  # fd 1 is the log now


def progress(label: str, done: int, total: int | None, detail: str = "") -> None:
    """One bar per label: redrawn in place on a terminal, a few plain lines elsewhere."""
    out = _out()
    if done < _State.last_done.get(label, 0):  # a new run under the same label
        _State.plain_done.pop(label, None)
    _State.last_done[label] = done
    fraction = min(1.0, done / total) if total else None
    if total:
        width = 24
        filled = int(width * (fraction or 0.0))
        text = f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    else:
        text = f"{label} {done}"
    if detail:
        text += f"  {detail}"
    finished = fraction is not None and fraction >= 1.0
    if _is_tty(out):
        now = time.monotonic()
        if not finished and now - _State.last_drawn.get(label, 0.0) < 0.2:
            return
        _State.last_drawn[label] = now
        out.write("\r\x1b[K" + text)
        _State.bar_open = True
        if finished:
            _end_bar()
        out.flush()
        return
    if fraction is None:
        now = time.monotonic()
        first = _State.last_drawn.setdefault(label, now)
        if now - first >= PLAIN_INTERVAL_S:
            _State.last_drawn[label] = now
            out.write(text + "\n")
            out.flush()
        return
    step = sum(1 for s in PLAIN_STEPS if fraction >= s)
    if step > _State.plain_done.get(label, 0):
        _State.plain_done[label] = step
        out.write(text + "\n")
        out.flush()
    if finished:
        _State.plain_done.pop(label, None)


def progress_end(label: str) -> None:
    """The bar of `label` is over (finished or not): the next one starts from nothing."""
    _State.plain_done.pop(label, None)
    _State.last_drawn.pop(label, None)
    _State.last_done.pop(label, None)
    _end_bar()


def worker_say(text: str) -> None:
    """From a Ray worker: a line that the driver shows on its terminal."""
    print(TAG + text, flush=True)


def worker_progress(label: str, done: int, total: int | None, detail: str = "") -> None:
    print(PROGRESS_TAG + json.dumps({"label": label, "done": done, "total": total, "detail": detail}), flush=True)


def _on_worker_lines(data: dict) -> None:
    for line in data.get("lines", ()):
        try:
            if line.startswith(PROGRESS_TAG):
                bar = json.loads(line[len(PROGRESS_TAG):])
                progress(bar["label"], int(bar["done"]), bar.get("total"), bar.get("detail", ""))
            elif line.startswith(TAG):
                say(line[len(TAG):])
        except (ValueError, KeyError, TypeError):
            continue  # a worker line that only looks like ours stays in the log


def attach_ray() -> None:
    """Show the tagged lines of Ray workers (call after ray.init with log_to_driver=True)."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher
    except ImportError:  # another Ray: worker lines stay in the log only
        return
    global_worker_stdstream_dispatcher.add_handler("raypost_console", _on_worker_lines)


@contextmanager
def quiet(log_path: Path, verbose: bool = False):
    """While inside, fds 1 and 2 write to `log_path`; `say` and `progress` reach the terminal.

    An exception that is not one of raypost's own errors leaves its traceback in the log and
    reaches the terminal as one StageError line naming the log."""
    if verbose or quiet_now():
        yield
        return
    from raypost.config import RecipeError
    from raypost.errors import StageError
    from raypost.models.resolve import ModelError
    from raypost.records import DataError

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _State.terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    _State.log_path = log_path
    try:
        yield
    except (RecipeError, StageError, ModelError, DataError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        traceback.print_exc()
        raise StageError(f"{type(error).__name__}: {error} (traceback in {log_path})") from error
    finally:
        _end_bar()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        _State.terminal.close()
        _State.terminal = None
        _State.log_path = None
        log.close()
