"""What a person watching `dipnode denoise` or `dipnode demo` sees while a fit runs."""
from __future__ import annotations

import io

from dipnode.node.cli.progress import FitProgress, format_seconds


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_give_epoch_elapsed_time_left_and_device() -> None:
    out, clock = io.StringIO(), Clock()
    p = FitProgress(30, "SDIP", "cpu", stream=out, tty=False, clock=clock)
    for epoch in range(1, 31):
        clock.t += 3.0  # 3 s per epoch
        p(epoch, 30, 0.5)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "      SDIP on cpu: 30 epochs"
    # One line per tenth of the fit, not one per epoch.
    assert len(lines) == 1 + 10
    assert lines[1] == "      SDIP on cpu: epoch 3/30 (10 %), 00:09 elapsed, about 01:21 left"
    assert lines[-1] == "      SDIP on cpu: epoch 30/30 (100 %), 01:30 elapsed"


def test_a_slow_fit_still_prints_every_half_minute() -> None:
    out, clock = io.StringIO(), Clock()
    p = FitProgress(200, "SDIP", "cuda:0 (GPU)", stream=out, tty=False, clock=clock, line_every_s=30)
    clock.t += 31
    p(1, 200)  # below a tenth, but 31 s since the last line
    assert out.getvalue().splitlines()[-1].startswith(
        "      SDIP on cuda:0 (GPU): epoch 1/200 (0 %), 00:31 elapsed, about 1:42:49 left")


def test_on_a_terminal_it_is_a_tqdm_bar_with_rate_and_time_left() -> None:
    out = io.StringIO()
    p = FitProgress(4, "SDIP", "cpu", stream=out, tty=True)
    for epoch in range(1, 5):
        p(epoch, 4, 0.1)
    p.close()
    text = out.getvalue()
    assert "SDIP on cpu: 100%" in text and "4/4 [" in text and "epoch" in text


def test_format_seconds() -> None:
    assert format_seconds(65) == "01:05" and format_seconds(3725) == "1:02:05"
