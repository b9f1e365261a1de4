"""Progress lines: a loop inside a loop that has lines of its own speaks only once it has run for a while."""
import logging

from llmemb_dist import progress
from llmemb_dist.progress import Progress


class Clock:
    """time.perf_counter as the loop would see it: a deterministic clock the test advances."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_quiet_start_speaks_only_after_every_s_then_at_most_every_every_s(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    log = logging.getLogger("test-progress")
    with caplog.at_level(logging.INFO, logger="test-progress"):
        short = Progress(log, "rat epoch 1 step", 5, quiet_start=True)
        for step in range(1, 6):  # a short epoch: no line at all, not even the last
            clock.now += 0.5
            short.update(step)
        assert caplog.records == []
        long = Progress(log, "rat epoch 2 step", 100, quiet_start=True)
        for step in range(1, 101):
            clock.now += 1.0
            long.update(step, f"loss {1 / step:.4f}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "rat epoch 2 step 10/100: loss 0.1000, ETA 2 min"
    assert len(lines) == 10 and lines[-1].startswith("rat epoch 2 step 100/100") and lines[-1].endswith("in all")
    # The plain kind speaks at once.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test-progress"):
        Progress(log, "embed", 10, unit="items").update(1)
    assert [r.getMessage() for r in caplog.records] == ["embed 1/10 items, ETA 0 s"]
