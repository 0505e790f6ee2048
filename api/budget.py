"""How many bytes a split will write, estimated before it is queued, and the output budgets it must fit.

The estimate is an upper bound from the request alone: every stem the preset can make (a
preset that drops silent stems is counted in full), at the source's rate and channels (more
than two fold to stereo), at the WAV's bit depth, plus the HQ copy (its bit rate; FLAC counted
as the WAV) and the restored copies when restoration is asked for.
"""

from __future__ import annotations

from pipelines.audio import HQ_FORMATS
from pipelines.errors import KeyBudgetExceeded, OverBudget


def estimate(
    stems: int, channels: int, sample_rate: int, seconds: float, bit_depth: int, hq_format: str | None, restored: bool
) -> dict:
    """The estimate and the numbers it comes from (they go into a refusal as they are)."""
    out_channels = min(max(channels, 1), 2)
    wav = out_channels * sample_rate * seconds * bit_depth / 8
    bit_rate = HQ_FORMATS[hq_format][3] if hq_format else 0
    hq = (wav if bit_rate is None else seconds * bit_rate / 8) if hq_format else 0.0
    files = stems * (2 if restored else 1)
    return {
        "estimated_bytes": int(files * (wav + hq) + 0.5),
        "stems": stems,
        "restored_copies": restored,
        "channels": out_channels,
        "sample_rate": sample_rate,
        "seconds": round(seconds, 3),
        "bit_depth": bit_depth,
        "hq_format": hq_format,
    }


def check_job(numbers: dict, max_bytes: int) -> None:
    if numbers["estimated_bytes"] > max_bytes:
        raise OverBudget(
            f"this split would write about {_size(numbers['estimated_bytes'])} ({numbers['stems']} stems"
            f"{' and their restored copies' if numbers['restored_copies'] else ''} x {numbers['channels']} ch x "
            f"{numbers['sample_rate']} Hz x {numbers['seconds']} s x {numbers['bit_depth'] // 8} bytes"
            f"{', plus HQ copies' if numbers['hq_format'] else ''}); the per-job budget is {_size(max_bytes)}. "
            f"Split a shorter selection, a lower bit depth or fewer stems",
            max_bytes=max_bytes,
            **numbers,
        )


def check_key(pending: int, numbers: dict, max_bytes: int) -> None:
    if numbers["estimated_bytes"] > max_bytes:  # could never fit, however long one waits
        raise OverBudget(
            f"this split would write about {_size(numbers['estimated_bytes'])}; the per-key budget of "
            f"queued and running output is {_size(max_bytes)}",
            max_bytes=max_bytes,
            **numbers,
        )
    if pending + numbers["estimated_bytes"] > max_bytes:
        raise KeyBudgetExceeded(
            f"this key's queued and running splits will write about {_size(pending)}; with this one "
            f"({_size(numbers['estimated_bytes'])}) that is over the per-key budget of {_size(max_bytes)}. "
            f"Retry when some have finished",
            retry_after=30,
            pending_bytes=pending,
            max_bytes=max_bytes,
            **numbers,
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
