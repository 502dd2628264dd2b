"""Progress that reads well wherever it goes: a live tqdm bar on a terminal, plain lines in a log.

A bar written to a file (CI logs, ``nohup``, a Prefect worker's log) is one line of thousands of carriage-return
updates. :func:`progress` therefore returns a tqdm bar only when its stream is a terminal; otherwise a
:class:`LineProgress` that writes one line at a steady pace — every 10 % of the total or every 30 s, whichever comes
first, and at the end — with the count, the percentage, the rate and the last postfix values. ``GRAIN_PROGRESS=bar``
or ``=lines`` forces either. Both have tqdm's ``update``, ``set_postfix`` and ``close``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


class LineProgress:
    """tqdm's small interface as plain lines (see the module docstring)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, stream: TextIO | None = None,
                 every_fraction: float = 0.1, every_seconds: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.postfix: dict[str, Any] = {}
        self._start = self._last_time = time.monotonic()
        self._start_n = initial
        self._last_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        step = (self.total or 0) * self.every_fraction
        if (step and self.n - self._last_n >= step) or now - self._last_time >= self.every_seconds:
            self._emit(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._last_n or self.n == self._start_n:
                self._emit(time.monotonic())

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be written now."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        rate = (self.n - self._start_n) / elapsed
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {count} {self.unit}{pct}, {rate:.3g} {self.unit}/s, {elapsed:.0f} s{extra}"

    def _emit(self, now: float) -> None:
        self._last_n, self._last_time = self.n, now
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()


class NullProgress:
    """A reporter that reports nothing (``progress(..., enabled=False) or NullProgress()``)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
             stream: TextIO | None = None) -> Any:
    """A progress reporter for ``total`` units: a tqdm bar on a terminal, :class:`LineProgress` elsewhere, None when
    not ``enabled``."""
    if not enabled:
        return None
    stream = stream or sys.stderr
    mode = os.environ.get("GRAIN_PROGRESS", "")
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if mode == "bar" or (mode != "lines" and tty):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, unit, initial, stream)
