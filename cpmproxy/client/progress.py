"""Progress bars for long syncs, on stderr, only when stderr is a terminal.

Deliberately tiny (no dependency): one line per folder, redrawn in place at most ~10 times a second, and
erased when the folder is done so that what remains on screen is the per-folder summary.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, TextIO

__all__ = ["NullProgress", "Progress", "ProgressFactory", "TerminalProgress", "progress_factory"]


if TYPE_CHECKING:  # (typing.Protocol only for type checkers: the runtime import costs start-up time)
    from typing import Protocol

    class Progress(Protocol):
        def update(self, messages: int, nbytes: int) -> None: ...

        def close(self) -> None: ...

    class ProgressFactory(Protocol):
        def __call__(self, label: str, total_messages: int, total_bytes: int) -> Progress: ...
else:
    Progress = ProgressFactory = object


def _columns() -> int:
    try:
        columns = os.get_terminal_size(2).columns
    except OSError:
        return 80
    return columns if columns >= 40 else 80  # some pseudo-terminals report 0


class NullProgress:
    def update(self, messages: int, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


class TerminalProgress:
    """``label  [#######.......]  1234/5000  12.3/48.0 MB  3.2 MB/s``"""

    INTERVAL = 0.1

    def __init__(self, label: str, total_messages: int, total_bytes: int, stream: TextIO) -> None:
        self.label = label
        self.total_messages = max(total_messages, 1)
        self.total_bytes = max(total_bytes, 1)
        self.messages = 0
        self.nbytes = 0
        self.stream = stream
        self.started = time.monotonic()
        self._last = 0.0
        self._draw()

    def update(self, messages: int, nbytes: int) -> None:
        self.messages += messages
        self.nbytes += nbytes
        now = time.monotonic()
        if now - self._last >= self.INTERVAL:
            self._draw()

    def _draw(self) -> None:
        self._last = time.monotonic()
        width = _columns()
        elapsed = max(self._last - self.started, 1e-6)
        frac = min(self.nbytes / self.total_bytes, 1.0)
        tail = (
            f" {self.messages}/{self.total_messages} {_size(self.nbytes)}/{_size(self.total_bytes)}"
            f" {_size(self.nbytes / elapsed)}/s"
        )
        label = self.label if len(self.label) <= 30 else "…" + self.label[-29:]
        bar_width = max(width - len(label) - len(tail) - 5, 5)
        filled = int(bar_width * frac)
        line = f"{label} [{'#' * filled}{'.' * (bar_width - filled)}]{tail}"
        self.stream.write("\r" + line[: width - 1])
        self.stream.flush()

    def close(self) -> None:
        width = _columns()
        self.stream.write("\r" + " " * (width - 1) + "\r")
        self.stream.flush()


def progress_factory(enabled: bool | None = None, stream: TextIO | None = None) -> ProgressFactory:
    """Bars on ``stream`` (default stderr) when it is a TTY (or ``enabled`` forces it either way)."""
    out = stream or sys.stderr
    if enabled is None:
        enabled = out.isatty()

    def make(label: str, total_messages: int, total_bytes: int) -> Progress:
        if not enabled:
            return NullProgress()
        return TerminalProgress(label, total_messages, total_bytes, out)

    return make
