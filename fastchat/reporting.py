"""What a long run tells the person watching it: progress with counts and time left (Progress), and the training-
curve writers of --report_to (tensorboard, wandb), which are an optional extra: `pip install -e '.[logging]'`."""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import IO

from tqdm import tqdm

# --report_to values: the writer's name -> the package it needs
WRITERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
REPORT_TO_CHOICES = ("none", *WRITERS)
LOGGING_EXTRA = "pip install -e '.[logging]'"


def missing_writers(report_to: str | list[str] | None, flag: str = "--report_to") -> list[str]:
    """One message per writer of `report_to` whose package is not installed, naming the flag and the extra."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [f"{flag} {name}: the {WRITERS[name]} package is not installed ({LOGGING_EXTRA} installs the writers)"
            for name in names if name in WRITERS and importlib.util.find_spec(WRITERS[name]) is None]


def wandb_offline_unless_asked() -> None:
    """W&B writes its run folder locally and sends nothing unless the user set WANDB_MODE (e.g. online) themselves."""
    os.environ.setdefault("WANDB_MODE", "offline")


def is_terminal(stream: IO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """done/total of a long loop, with the time elapsed and an estimate of the time left. On a terminal, a tqdm bar;
    elsewhere (a stage log, a pipe) one line each time another `every_percent` of the total is done: a bar redrawn
    in a file is one line per update, thousands in a long stage."""

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, every_percent: float = 10,
                 stream: IO | None = None):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.every_percent = total, desc, unit, every_percent
        self.done = self.start_done = initial
        self.started = time.monotonic()
        self.last_band = self.band(initial)  # a resumed loop does not report what was done before it
        self.postfix = ""
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                        file=self.stream) if is_terminal(self.stream) else None

    def band(self, done: int) -> int:
        """Which every_percent slice of the total `done` has reached."""
        return int(100 * done / self.total // self.every_percent) if self.total else 0

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(n)
            return
        band = self.band(self.done)
        if band > self.last_band:
            self.last_band = band
            self.write(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        new = self.done - self.start_done
        left = elapsed / new * (self.total - self.done) if new else None
        eta = tqdm.format_interval(left) if left is not None else "?"
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{tqdm.format_interval(elapsed)} elapsed, ETA {eta}" + (f", {self.postfix}" if self.postfix else ""))

    def write(self, text: str) -> None:
        """A line among the progress reports (under the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
