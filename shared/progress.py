"""Progress of a long loop: a tqdm bar with live fields, or, when bars are off, a log line every so often."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Counts iterations of a loop of `total`; `report(done, fields)` shows the loop's current measures.

    With `bar`, a tqdm bar on stderr (rate and ETA from tqdm) whose postfix holds the fields. Without, `report`
    writes one line `desc: done/total (rate it/s, elapsed, ETA ...) key=value ...` when at least `log_seconds`
    have passed since the previous line, and always for the last iteration.
    """

    def __init__(self, total: int, desc: str, bar: bool = True, log_seconds: float = 30.0):
        self.total, self.desc, self.log_seconds = total, desc, log_seconds
        self.bar = tqdm(total=total, desc=desc, disable=not bar, dynamic_ncols=True, mininterval=0.5,
                        file=sys.stderr)
        self.start = self.last_line = time.perf_counter()

    def update(self, n: int = 1) -> None:
        """Count `n` more iterations."""
        self.bar.update(n)

    def report(self, done: int, fields: dict[str, str]) -> None:
        """Show `fields` after `done` iterations: on the bar, or as a log line when one is due."""
        if not self.bar.disable:
            self.bar.set_postfix(fields)
            return
        now = time.perf_counter()
        if done < self.total and now - self.last_line < self.log_seconds:
            return
        self.last_line = now
        elapsed = now - self.start
        rate = done / max(elapsed, 1e-9)
        timing = f"{rate:.3g} it/s, {tqdm.format_interval(elapsed)} elapsed"
        if done < self.total:
            timing += f", ETA {tqdm.format_interval((self.total - done) / rate) if done else '?'}"
        tqdm.write(f"{self.desc}: {done}/{self.total} ({timing}) " + " ".join(f"{k}={v}" for k, v in fields.items()))

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
