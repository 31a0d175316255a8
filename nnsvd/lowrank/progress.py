"""Progress of a long loop as log lines, readable in a terminal and in a log file alike.

A bar redraws one line with carriage returns, which a log file keeps as one endless line; this
logs ``what: done/total unit (rate, ETA)`` at most every ``every`` seconds, and once at the end.
"""

from __future__ import annotations

import logging
import time


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """``with Progress("evaluating test", 8, "windows", log, rate_unit="tokens") as p: p.update(1, tokens)``.

    ``update(n, amount)`` counts n steps done and ``amount`` of ``rate_unit`` (tokens, say) for the rate;
    without a rate_unit the rate is in steps. A loop of one step, or one that ends early, logs nothing at the end.
    """

    def __init__(self, what: str, total: int, unit: str, logger: logging.Logger, *, rate_unit: str | None = None,
                 every: float = 15.0):
        self.what, self.total, self.unit, self.log = what, total, unit, logger
        self.rate_unit, self.every = rate_unit, every
        self.done, self.amount = 0, 0
        self.start = self.last = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.finish()

    def finish(self) -> None:
        """The closing line, when the loop ran to its end."""
        if self.total > 1 and self.done >= self.total:
            elapsed = time.perf_counter() - self.start
            self.log.info("%s: %d %s done in %s (%s)", self.what, self.done, self.unit, _duration(elapsed),
                          self._rate(elapsed))

    def _rate(self, elapsed: float) -> str:
        count, unit = (self.amount, self.rate_unit) if self.rate_unit else (self.done, self.unit)
        return f"{count / max(elapsed, 1e-9):,.1f} {unit}/s"

    def update(self, n: int = 1, amount: int = 0) -> None:
        self.done += n
        self.amount += amount
        now = time.perf_counter()
        if now - self.last < self.every or self.done >= self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done)
        self.log.info("%s: %d/%d %s, %s, about %s left", self.what, self.done, self.total, self.unit,
                      self._rate(elapsed), _duration(eta))
