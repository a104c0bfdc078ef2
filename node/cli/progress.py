"""Progress of a fit for a person watching a command: epochs, elapsed time, time left, device.

On a terminal a tqdm bar (the same as `dipnode send`'s); elsewhere (a log file, a pipe, CI)
one line at each tenth of the fit and at least every `line_every_s`, so that a redirected
`dipnode demo` or `dipnode denoise` never sits silent for minutes.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

__all__ = ["FitProgress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``1:05`` or ``1:02:05``: what tqdm shows, for the line form."""
    return tqdm.format_interval(max(0.0, seconds))


class FitProgress:
    """Callable as the engine's ``progress(epoch, epochs, loss)``; ``close()`` when done.

    label: what is fitted ("SDIP"); device: where ("cpu", "cuda:0 (NVIDIA H200)").
    tty: force the bar (True) or the lines (False); None: the bar when ``stream`` is a terminal.
    clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, total_epochs: int, label: str, device: str, *, stream: TextIO | None = None,
                 tty: bool | None = None, line_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label, self.device = total_epochs, label, device
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.line_every_s = line_every_s
        self._clock = clock
        self._start = clock()
        self._last_line_at = self._start
        self._last_tenth = 0
        self._bar = (tqdm(total=total_epochs, desc=f"{label} on {device}", unit="epoch",
                          file=self.stream) if self.tty else None)
        if self._bar is None:
            self._line(f"{label} on {device}: {total_epochs} epochs")

    def _line(self, text: str) -> None:
        print(f"      {text}", file=self.stream, flush=True)

    def __call__(self, epoch: int, epochs: int, loss: float | None = None) -> None:
        self.total = epochs
        if self._bar is not None:
            self._bar.total = epochs
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
            self._bar.update(epoch - self._bar.n)
            return
        now = self._clock()
        tenth = int(10 * epoch / epochs) if epochs else 10
        if tenth > self._last_tenth or now - self._last_line_at >= self.line_every_s:
            self._last_tenth = max(tenth, self._last_tenth)
            self._last_line_at = now
            self._line(self.status(epoch, epochs, now))

    def status(self, epoch: int, epochs: int, now: float | None = None) -> str:
        """``SDIP on cpu: epoch 9/30 (30 %), 0:27 elapsed, about 1:03 left``."""
        elapsed = (self._clock() if now is None else now) - self._start
        text = (f"{self.label} on {self.device}: epoch {epoch}/{epochs} "
                f"({100 * epoch / epochs:.0f} %), {format_seconds(elapsed)} elapsed")
        if 0 < epoch < epochs:
            text += f", about {format_seconds(elapsed * (epochs - epoch) / epoch)} left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
