"""Which backend runs a network on this CPU, decided by timing them here once and kept in the model store.

Why measure: no rule picks the faster backend on every CPU. ONNX Runtime ran the full-size
htdemucs in about half torch's time on an AMD EPYC, and level with torch (for 1.8x the memory)
on an Intel Xeon with AVX512-BF16 (issue 21). So the first time a model meets a CPU (at
`stems models install`, or in the worker or CLI that loads it first) each backend that can
run it runs one segment, interleaved (A B, then B A, ...) so a neighbour's load falls on both,
and the median seconds are kept, keyed by the CPU (model name and the flags that matter), the
torch and onnxruntime versions and the thread count (`pipelines.machine`). `params.backend`
"auto" follows the kept choice; "torch" or "onnxruntime" overrides it.

A record is one small json per (model, machine) under `derived/backend-choice/` in the store,
written to a temp file and renamed, so two processes meeting a new CPU at once each write a
whole record and the last one stays; a reader never sees half of one. A record that names
other weights, another segment length or batch, or (by its content) another machine is not
used: the model is measured again.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..machine import Machine

log = logging.getLogger(__name__)

DIRECTORY = Path("derived") / "backend-choice"
Backend = Literal["torch", "onnxruntime"]
# ONNX Runtime must be this much faster to be chosen: under it the two are level within timing noise,
# and torch holds about half the memory (1.25 GB against 2.40 GB for htdemucs in issue 21).
ONNX_MARGIN = 0.97
RUNS = 3  # timed rounds after a warm-up of each backend, while within BUDGET_S
BUDGET_S = 6.0


class BackendRecord(BaseModel):
    """One model's backends timed on one machine: median seconds per segment and the choice made."""

    model_config = ConfigDict(extra="forbid")
    model_id: str
    files: dict[str, str]  # weight file name -> sha256 (the weights that were timed)
    segment_samples: int  # the segment the network ran at
    batch: int  # segments per forward
    machine: Machine
    seconds: dict[str, float]  # backend -> median seconds per forward
    rounds: int
    choice: Backend
    loadavg: list[float]  # of the machine when measured: a busy machine's figures are noisier
    measured_at: float

    def matches(self, files: dict[str, str], segment_samples: int, batch: int, machine: Machine) -> bool:
        return (self.files, self.segment_samples, self.batch, self.machine) == (files, segment_samples, batch, machine)

    def summary(self) -> str:
        figures = ", ".join(f"{b} {s * 1000:.0f} ms" for b, s in sorted(self.seconds.items()))
        return (
            f"measured on this CPU: {figures} per segment (median of {self.rounds}, "
            f"load {self.loadavg[0]:.1f}); {self.choice} chosen"
        )


def path_for(root: Path, model_id: str, machine: Machine) -> Path:
    return Path(root) / DIRECTORY / f"{model_id}-{machine.key()}.json"


def load(path: Path) -> BackendRecord | None:
    try:
        return BackendRecord.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None  # absent, or written by another version of this code: measure again


def recorded(
    root: Path, model_id: str, files: dict[str, str], segment_samples: int, batch: int, machine: Machine
) -> BackendRecord | None:
    """The kept record for exactly these weights, segment, batch and machine, or None."""
    record = load(path_for(root, model_id, machine))
    return record if record is not None and record.matches(files, segment_samples, batch, machine) else None


def records(root: Path, model_id: str) -> list[BackendRecord]:
    """Every machine's record of `model_id` in the store (for `stems models list`)."""
    found = (load(p) for p in sorted((Path(root) / DIRECTORY).glob(f"{model_id}-*.json")))
    return [r for r in found if r is not None and r.model_id == model_id]


def save(root: Path, record: BackendRecord) -> Path | None:
    """Write `record` atomically; a store that cannot be written keeps the choice for this process only."""
    path = path_for(root, record.model_id, record.machine)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".part")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(record.model_dump_json(indent=1) + "\n")
            os.chmod(tmp, 0o644)  # workers may run as another user
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        log.warning(
            "cannot keep the backend figures of %s in %s (%s); measured again by the next process",
            record.model_id,
            path,
            exc,
        )
        return None
    return path


def forget(root: Path, model_id: str, machine: Machine) -> bool:
    """Drop this machine's record of `model_id` (`stems models bench` measures again)."""
    try:
        path_for(root, model_id, machine).unlink()
        return True
    except FileNotFoundError:
        return False


def time_interleaved(
    candidates: dict[str, Callable[[], object]], runs: int = RUNS, budget_s: float = BUDGET_S
) -> tuple[dict[str, float], int]:
    """Median seconds of each callable and the rounds timed: a warm-up each, then rounds in alternating order.

    At least one timed round; more while under `budget_s`, so a slow CPU pays a few seconds, not minutes.
    """
    for run in candidates.values():
        run()  # first calls pay for allocations and kernel selection
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    started = time.perf_counter()
    for k in range(runs):
        for name in names if k % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s:
            break
    return {n: statistics.median(t) for n, t in times.items()}, len(times[names[0]])


def choose(seconds: dict[str, float]) -> Backend:
    if "onnxruntime" in seconds and seconds["onnxruntime"] < ONNX_MARGIN * seconds["torch"]:
        return "onnxruntime"
    return "torch"
