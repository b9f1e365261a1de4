"""Progress lines of the long loops (SCFT steps, RAT epochs, embedded items): done of total, and an ETA."""
from __future__ import annotations

import logging
import time

EVERY_S = 10.0  # the least time between two lines, besides the first and the last: a log to read, not a ticker


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Lines like `scft step 40/80: loss 2.3100, ETA 2 min` or `embed 2000/9000 items, ETA 35 s`.

    The ETA extrapolates this process's pace since `start` (where a resumed run resumed); `at_most` marks
    a total the loop may stop short of (early stopping). `quiet_start`: no line at all until the loop has run
    for EVERY_S, for loops inside a loop that has lines of its own (the steps of an epoch), which then
    speak only when they are long.
    """

    def __init__(self, log: logging.Logger, what: str, total: int, *, unit: str = "", start: int = 0,
                 at_most: bool = False, quiet_start: bool = False):
        self.log, self.what, self.total, self.unit = log, what, total, f" {unit}" if unit else ""
        self.start, self.at_most, self.quiet_start = start, at_most, quiet_start
        self.began = time.perf_counter()
        self.last_line: float | None = None

    def update(self, done: int, details: str = "", last: bool = False) -> None:
        """`last`: no update follows, though the total is not reached."""
        now = time.perf_counter()
        if self.quiet_start and self.last_line is None and now - self.began < EVERY_S:
            return
        last = last or done >= self.total
        if not last and self.last_line is not None and now - self.last_line < EVERY_S:
            return
        self.last_line = now
        spent = now - self.began
        if last:
            tail = f"{duration(spent)} in all"
        else:
            left = spent / max(done - self.start, 1) * (self.total - done)
            tail = f"ETA {'at most ' if self.at_most else ''}{duration(left)}"
        details = f": {details}" if details else ""
        self.log.info("%s %d/%d%s%s, %s", self.what, done, self.total, self.unit, details, tail)
