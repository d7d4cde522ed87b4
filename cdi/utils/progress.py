"""Progress of long loops: a live bar on a terminal, plain lines in a log.

A batch job's output is a file, where a live bar writes nothing useful (rich
disables it) and the log stays empty for hours. ``progress_bar`` therefore
returns a rich bar only when stderr is a terminal, and otherwise a
``LineProgress`` that prints one plain line every ``CDI_PROGRESS_INTERVAL``
seconds (default 30) with the count, the rate in images per second and the
time left, e.g.::

    extracting features: 120/1000 images (12%), 3.41 images/s, 4m18s left

``quiet_library_progress`` silences the progress bars transformers and
diffusers draw while loading weights ("Loading checkpoint shards"): cdi
loads local files and reports its own progress.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

#: Environment variable: seconds between two progress lines when stderr is not a terminal.
INTERVAL_ENV = "CDI_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        return max(0.0, float(text)) if text else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def format_duration(seconds: float) -> str:
    """``42s``, ``4m18s`` or ``3h05m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LineProgress:
    """Plain progress lines for logs: the interface of the rich ``Progress`` that cdi uses.

    Supports ``with``, ``add_task(description, total=n)``, ``advance(task, n)``
    and ``console.print(text)``; prints the first update at once, then at most
    one line per ``interval`` seconds, and a last line when the task completes.
    """

    def __init__(self, *, stream: IO[str] | None = None, interval: float | None = None,
                 disable: bool = False, unit: str = "images") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        self.disable = disable
        self.unit = unit
        self.console = self  # rich's ``progress.console.print`` goes to the same stream
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        task = len(self._tasks)
        self._tasks[task] = {"description": description, "total": total, "done": 0,
                             "start": time.monotonic(), "last": None}
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        state = self._tasks[task]
        state["done"] += advance
        now = time.monotonic()
        finished = state["total"] is not None and state["done"] >= state["total"]
        if finished or state["last"] is None or now - state["last"] >= self.interval:
            state["last"] = now
            self._write(self.line(state, now, self.unit))

    def print(self, text: str, **_: Any) -> None:
        from rich.text import Text

        self._write(Text.from_markup(str(text)).plain)

    @staticmethod
    def line(state: dict[str, Any], now: float, unit: str = "images") -> str:
        """One progress line: count, share, rate and time left."""
        done, total = state["done"], state["total"]
        elapsed = max(now - state["start"], 1e-9)
        rate = done / elapsed
        parts = [f"{state['description']}: {done:g}" + (f"/{total:g}" if total else "") + f" {unit}"]
        if total:
            parts[0] += f" ({100 * done / total:.0f}%)"
        parts.append(f"{rate:.2f} {unit}/s")
        if total and done >= total:
            parts.append(f"done in {format_duration(elapsed)}")
        elif total and rate > 0:
            parts.append(f"{format_duration((total - done) / rate)} left")
        return ", ".join(parts)

    def _write(self, text: str) -> None:
        if self.disable:
            return
        self.stream.write(text + "\n")
        self.stream.flush()


def progress_bar(columns: tuple, *, disable: bool = False):
    """A rich ``Progress`` with ``columns`` on a terminal, else a ``LineProgress``.

    ``columns`` are rich progress columns; they are used only on a terminal.
    """
    stream = sys.stderr
    if stream.isatty():
        from rich.console import Console
        from rich.progress import Progress

        return Progress(*columns, console=Console(stderr=True), disable=disable)
    return LineProgress(stream=stream, disable=disable)


def quiet_library_progress() -> None:
    """Silence the weight-loading progress bars of transformers and diffusers (process-wide)."""
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
