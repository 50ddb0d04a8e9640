"""A dependency-free progress line on stderr: items/s and ETA, redrawn at most a few times a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(s: float) -> str:
    s = max(0, int(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """``Progress(total, "cache", unit="img")``; ``update(n, **fields)``; ``close()``."""

    def __init__(
        self, total: int, label: str, unit: str = "img", enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self.fields: dict[str, str] = {}
        # a terminal gets one redrawn line; a log file (cluster jobs) a plain line per 10 %
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._next_log = 0.1

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int, **fields: float | str) -> None:
        self.done += n
        for k, v in fields.items():
            self.fields[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        now = time.perf_counter()
        if not self.enabled:
            return
        if self.tty and (now - self._last_draw > 0.25 or self.done >= self.total):
            self._last_draw = now
            self._draw()
        elif not self.tty and self.total and self.done >= self._next_log * self.total:
            self._next_log = (int(10 * self.done / self.total) + 1) / 10
            self._draw()

    def _draw(self) -> None:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(24 * frac)
        eta = (self.total - self.done) / self.rate if self.rate > 0 else 0.0
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        start = "\r" if self.tty else ""
        line = (
            f"{start}{self.label} [{bar:<24}] {self.done}/{self.total} {self.rate:,.0f} {self.unit}/s "
            f"ETA {format_seconds(eta)} {extra}"
        )
        self.stream.write(line[:200] + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.total and self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
