"""Progress on stderr through tqdm: a redrawn bar on a terminal, a plain line about every 10 % in a log
file (cluster jobs: a bar redrawn with carriage returns makes an unreadable log), nothing when off."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


class _Lines:
    """A stream for tqdm that turns each redraw ("\\r" + status) into one plain line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, s: str) -> None:
        s = s.replace("\r", "").rstrip()
        count = s.split(" [")[0]  # label, percentage, bar, n/total (not the rate, which moves)
        if s and count != self.last:  # tqdm redraws the final state once more on close
            self.stream.write(s + "\n")
            self.last = count

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """``Progress(total, "cache", unit="img")``; ``update(n, **fields)``; ``close()``.

    ``initial``: items already done (a resumed epoch). On a terminal tqdm redraws at most 4 times a
    second; elsewhere it writes one line per ``total / 10`` items (and never on a timer).
    """

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "img",
        enabled: bool = True,
        stream: TextIO | None = None,
        initial: int = 0,
    ) -> None:
        stream = stream or sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        kw: dict[str, Any] = (
            {"file": stream, "mininterval": 0.25, "dynamic_ncols": True}
            if tty
            else {
                "file": _Lines(stream),
                "mininterval": 0,
                "maxinterval": float("inf"),
                "miniters": max(1, total // 10),
            }  # fmt: skip
        )
        self.bar = tqdm(total=total, desc=label, unit=unit, disable=not enabled, initial=initial, **kw)
        self.fields: dict[str, str] = {}

    def update(self, n: int, **fields: float | str) -> None:
        if fields:
            self.fields.update({k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in fields.items()})
            self.bar.set_postfix(self.fields, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
