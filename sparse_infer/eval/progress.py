"""The progress display of a long eval run: a rich bar, or a line per sample in logs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def sample_weight(sample: Mapping[str, Any]) -> int:
    # Cost grows with prompt length; weighting the bar by tokens keeps the ETA
    # honest when short prompts run first.
    return max(1, int(sample.get("tokens") or sample.get("length") or 1)) + 8 * int(sample.get("max_new_tokens", 0))


class ProgressBar:
    """rich progress bar (weighted by prompt tokens), a line per sample where the
    console is not a terminal (logs of long runs under nohup), or nothing."""

    def __init__(self, enabled: bool, total: int, count: int):
        self.enabled = enabled and count > 0
        self.count = count
        self.done = 0
        if self.enabled:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[samples]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._task = self._p.add_task("", total=total, samples=f"0/{count}")

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._p.__exit__(*exc)

    def describe(self, text: str) -> None:
        if self.enabled:
            self._p.update(self._task, description=text)

    def advance(self, weight: int, result: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        self._p.update(self._task, advance=weight, samples=f"{self.done}/{self.count}")
        if not self._p.console.is_terminal:
            # rich draws no live bar into a file or pipe: print one line per sample instead.
            # The ETA is the mean rate so far; rich's own estimate looks at the last 30 s
            # only, and one long sample takes minutes.
            task = self._p.tasks[0]  # the only task
            elapsed = task.elapsed or 0.0
            eta = elapsed * task.remaining / max(task.completed, 1)
            self._p.console.print(
                f"{self.done}/{self.count} {task.description}: {result}; "
                f"elapsed {_clock_time(elapsed)}, ETA {_clock_time(eta)}",
                highlight=False,
                soft_wrap=True,
            )


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
