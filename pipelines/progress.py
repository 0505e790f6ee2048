"""How a run reports its progress: a callable of (fraction done, message), and the share of one part."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]


def part_of(progress: Progress | None, done: float, share: float) -> Progress | None:
    """The progress of one part of a run: its fraction f reported as `done + f * share` of the whole."""
    if progress is None:
        return None
    return lambda f, m: progress(done + f * share, m)
