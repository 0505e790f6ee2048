"""Peak memory of `stems split` at two track lengths, as a user runs it: `python -m bench.cli_memory`.

For each preset (and optionally a chain of it, e.g. a DSP fallback), a generated stereo track
of each length is split by the CLI in a fresh process, and that process's peak RSS is read
from the kernel (wait4). The ratio long / short is what streaming keeps near 1. Writes
bench/cli_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SR = 44100
DEFAULT = "phantom_center,2_tracks@dsp.repet_sim,dereverb@dsp.wpe"


def make_track(path: Path, seconds: float) -> None:
    """A noisy melody with a repeating beat and a reverberant tail, written 10 s at a time."""
    from pipelines import audio as A

    rng = np.random.default_rng(0)
    n = int(seconds * SR)
    with A.WavWriter(path, SR, 2, 16) as w:
        for lo in range(0, n, 10 * SR):
            t = np.arange(lo, min(n, lo + 10 * SR)) / SR
            voice = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)
            beat = 0.2 * np.exp(-(t % 0.5) * 30) * np.sin(2 * np.pi * 60 * t)
            left = voice + beat + 0.1 * np.sin(2 * np.pi * 330 * t + 1)
            w.write((np.stack([left, voice + beat]) + 0.02 * rng.standard_normal((2, t.size))).astype(np.float32))


def measure(track: Path, preset: str, chain: str | None, out: Path) -> dict:
    argv = [
        sys.executable,
        "-m",
        "stems.cli",
        "split",
        str(track),
        "--preset",
        preset,
        "--out",
        str(out),
        "--model-dir",
        str(out / "no-models"),
        "--device",
        "cpu",
    ]
    if chain:
        argv += ["--chain", chain]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"stems split {preset} failed: {err[-2000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "maxrss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", type=float, default=60.0)
    ap.add_argument("--long", type=float, default=3600.0)
    ap.add_argument("--presets", default=DEFAULT, help="comma-separated PRESET[@CHAIN]")
    ap.add_argument("--json", default=str(ROOT / "bench" / "cli_memory.json"))
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="stems-cli-mem-") as d:
        tracks = {}
        for seconds in (args.short, args.long):
            tracks[seconds] = Path(d) / f"track-{seconds:g}.wav"
            make_track(tracks[seconds], seconds)
        for item in args.presets.split(","):
            preset, _, chain = item.partition("@")
            runs = {
                f"{s:g}s": measure(tracks[s], preset, chain or None, Path(d) / f"out-{preset}-{s:g}")
                for s in (args.short, args.long)
            }
            short, long_ = runs[f"{args.short:g}s"], runs[f"{args.long:g}s"]
            ratio = round(long_["maxrss_mib"] / short["maxrss_mib"], 3)
            results[item] = {**runs, "ratio": ratio}
            print(
                f"{item:<26} peak RSS {short['maxrss_mib']:7.0f} MiB at {args.short:g} s ({short['seconds']} s), "
                f"{long_['maxrss_mib']:7.0f} MiB at {args.long:g} s ({long_['seconds']} s): ratio {ratio:.2f}",
                flush=True,
            )
    from pipelines.machine import bench_description  # the figures hold for this machine, at this load

    Path(args.json).write_text(
        json.dumps({"cpus": os.cpu_count(), "machine": bench_description(), "results": results}, indent=1) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
