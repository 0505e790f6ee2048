"""The GPU half of the performance benchmark: `python -m bench.gpu` on a machine with CUDA.

Writes bench/gpu_results.json (after every figure, so a cut-off run keeps what it measured)
and prints a table. Everything runs on one GPU in one run, with a random full-size htdemucs
(no trained weights are available here) and generated music:

- `cuda_path`: the worker's streaming separation on CUDA in float32, batch 1, against demucs's
  own `apply_model` on CUDA (the CLI's path), max abs difference.
- `model[<precision>, batch <n>]`: real-time factor (audio seconds per wall second) of the
  streaming separation of one track, its speed / apply_model's, peak CUDA memory, and its
  agreement with float32: the SDR of its output against the float32 output (worst stem).
  `auto` is what a worker uses on a GPU (families.params.DEMUCS_GPU_PRECISION, DEMUCS_GPU_BATCH).
- `worker_job`: a whole job through the worker's code (run_split: storage, decode, separate,
  24-bit WAV + AAC, upload) with `auto`: its real-time factor and its time / apply_model alone.
- `memory_ratio_60min_vs_1min[4_tracks]`: peak RSS of a fresh worker process on a 60-minute vs
  a 1-minute track, with its peak CUDA memory.

The last run's output is kept in bench/gpu_results.json (docs/benchmarks.md summarises it).

The agreement figure bounds what mixed precision costs: an output that agrees with float32
at A dB differs from it by noise A dB down, which moves a stem's SDR against any reference
scoring S dB by about 10*log10(1 + 10**((S - A) / 10)) dB (0.04 dB for S = 10, A = 30) when that
noise is independent of the model's own error. Random weights are not trained ones: the
figure shows the numerics of the architecture, not of the released checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.perf import Worker, _figure, memory_ratio, progress_log, write_music

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "gpu_results.json"
AGREEMENT_GOAL_DB = 30.0  # agreement with float32 that mixed precision must keep (see the docstring)


def sdr(ref: np.ndarray, est: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - est) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


class Clock:
    """Wall time of GPU work: synchronise before reading the clock, or queued kernels go uncounted."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def time(self, fn):
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="a small model and short inputs (a smoke run; runs on a CPU)")
    ap.add_argument("--track-seconds", type=float, default=300.0, help="length of the model-speed track")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--if-available", action="store_true", help="exit 0 with a note when there is no CUDA device")
    args = ap.parse_args()

    import torch
    from demucs.apply import apply_model

    from pipelines import audio as A
    from pipelines.engine import Engine, resolve_device
    from pipelines.families.params import DEMUCS_GPU_BATCH as GPU_BATCH, DEMUCS_GPU_PRECISION as GPU_PRECISION
    from pipelines.modelstore import ModelStore
    from stems.redisboot import start_redis
    from tools.random_models import make_random_demucs

    device = resolve_device("auto")
    if not device.startswith("cuda") and not args.quick:
        print(
            "bench.gpu needs a CUDA device (torch.cuda.is_available() is False): GPU figures not measured; "
            "--quick runs on a CPU"
        )
        return 0 if args.if_available else 2
    started = time.perf_counter()
    log = progress_log(started)
    q = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="stems-bench-gpu-"))
    redis, url = start_redis(tmp / "redis")
    machine = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    figures: list[dict] = []

    def save() -> None:
        doc = {
            "machine": machine,
            "quick": q,
            "total_seconds": round(time.perf_counter() - started, 1),
            "command": "python -m bench.gpu" + (" --quick" if q else ""),
            "figures": figures,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")

    clock = Clock(device)
    try:
        files = make_random_demucs("htdemucs", tmp / "weights", "small" if q else "full", seed=0)

        def store(name: str, params: dict) -> ModelStore:
            s = ModelStore(tmp / f"models-{name}")
            s.install("htdemucs", files, params=params)
            return s

        seconds = 8.0 if q else args.track_seconds
        track, sr = A.decode(write_music(tmp / "track.wav", seconds, 7))
        warm_clip = track[:, : 10 * sr]
        log(f"device {device} ({machine['gpu']}); track {seconds:g} s")

        # 1. demucs's own path on this device: the reference for correctness and speed
        configs = [("float32", 1), ("float32", GPU_BATCH), ("bfloat16", GPU_BATCH)]
        if device.startswith("cuda"):
            configs.append(("float16", GPU_BATCH))
        configs.append(("auto", "auto"))
        engines = {
            c: Engine(store(f"{c[0]}-{c[1]}", {"precision": c[0], "batch": c[1]}), device=device) for c in configs
        }
        model = engines[("float32", 1)].separator("htdemucs").model
        wav = torch.from_numpy(track)
        ref = wav.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8

        def demucs_apply(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                out = apply_model(
                    model,
                    ((x - mean) / std)[None],
                    shifts=0,
                    split=True,
                    overlap=0.25,
                    device=device,
                    num_workers=0,
                    progress=False,
                )
                return out[0].mul_(std).add_(mean)

        demucs_apply(torch.from_numpy(np.ascontiguousarray(warm_clip)))  # cuDNN / cuFFT plans
        ref_out, ref_s = clock.time(lambda: demucs_apply(wav))
        ref_s = min(ref_s, clock.time(lambda: demucs_apply(wav))[1])
        log(f"apply_model float32: {ref_s:.2f} s ({seconds / ref_s:.1f}x real time)")
        ref_arrays = {name: ref_out[k].cpu().numpy() for k, name in enumerate(model.sources)}

        # 2. our streaming separation in each precision and batch
        outs: dict = {}
        for c in configs:
            engine = engines[c]
            engine.run_model("htdemucs", warm_clip, sr)
            sep = engine.separator("htdemucs")
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            outs[c], t = clock.time(lambda engine=engine: engine.run_model("htdemucs", track, sr))
            t = min(t, clock.time(lambda engine=engine: engine.run_model("htdemucs", track, sr))[1])
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
            base = outs[("float32", 1)]
            agreement = min(sdr(base[s], outs[c][s]) for s in base)
            label = f"model[{c[0]}, batch {c[1]}]" + (
                f" = [{sep.precision}, batch {sep.batch}]" if c[0] == "auto" else ""
            )
            figures.append(
                _figure(
                    label,
                    seconds / t,
                    f"faster than apply_model; agreement >= {AGREEMENT_GOAL_DB:g} dB",
                    f"real-time factor of Engine.run_model('htdemucs') on a {seconds:g} s "
                    f"track on {device}, best of 2 after a warm-up; agreement = worst stem's SDR against float32 batch 1",
                    seconds=round(t, 3),
                    speed_vs_apply_model=round(ref_s / t, 3),
                    agreement_db=round(agreement, 2),
                    agreement_ok=bool(agreement >= AGREEMENT_GOAL_DB),
                    cuda_peak_mib=None if peak is None else round(peak),
                    fallbacks_to_float32=sep.fallbacks,
                    resolved=[sep.precision, sep.batch],
                )
            )
            log(f"{label}: {t:.2f} s, agreement {agreement:.1f} dB")
            save()
        diff = max(float(np.max(np.abs(outs[("float32", 1)][s] - ref_arrays[s]))) for s in ref_arrays)
        figures.insert(
            0,
            _figure(
                "cuda_path",
                diff,
                "<= 1e-4",
                "max abs difference, Engine.run_model float32 batch 1 "
                f"on {device} vs demucs apply_model (CLI normalisation) on {device}, {seconds:g} s "
                "track",
                apply_model_seconds=round(ref_s, 3),
                apply_model_realtime=round(seconds / ref_s, 2),
            ),
        )
        save()
        del outs, engines

        # 3. a whole job through the worker's code, as a GPU worker runs it (auto precision and batch)
        auto = store("worker", {})
        worker = Worker(tmp / "warm", url, auto.root, cache=False, device=device)
        clip = write_music(tmp / "job.flac", seconds, 8)
        worker.split(worker.submit(write_music(tmp / "warm.flac", 5.0, 9), "4_tracks"))
        jobs = [worker.split(worker.submit(clip, "4_tracks")) for _ in range(2)]
        no_hq = worker.split(worker.submit(clip, "4_tracks", hq="none"))
        best = min(j["seconds"] for j in jobs)
        figures.append(
            _figure(
                "worker_job",
                seconds / best,
                "-",
                f"real-time factor of run_split, 4_tracks on a "
                f"{seconds:g} s FLAC (storage, decode, separate in {GPU_PRECISION} batch {GPU_BATCH}, "
                "4 x 24-bit WAV + AAC, upload), warm worker, no cache; best of 2",
                seconds=[round(j["seconds"], 2) for j in jobs],
                vs_apply_model=round(best / ref_s, 3),
                without_hq_seconds=round(no_hq["seconds"], 2),
                without_hq_vs_apply_model=round(no_hq["seconds"] / ref_s, 3),
            )
        )
        log(f"worker job: {best:.2f} s; without HQ {no_hq['seconds']:.2f} s; apply_model {ref_s:.2f} s")
        save()

        # 4. memory of a fresh worker process: an hour vs a minute
        if not args.skip_memory:
            # HQ as FLAC: four hour-long AAC encodes outran the 10-minute call on the H200 machine's CPUs
            figures.append(
                memory_ratio(
                    tmp,
                    url,
                    auto.root,
                    "4_tracks",
                    10.0 if q else 60.0,
                    30.0 if q else 3600.0,
                    "a 60-minute vs a 1-minute stereo track" if not q else "30 s vs 10 s",
                    "flac",
                    log,
                    device=device,
                    source="wav",
                )
            )
            save()
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    save()
    print_table(json.loads(args.out.read_text()))
    return 0


def print_table(doc: dict) -> None:
    m = doc["machine"]
    print(f"\nstems on {m['gpu'] or m['device']} (torch {m['torch']}, CUDA {m['cuda']}; {doc['total_seconds']:.0f} s)")
    for f in doc["figures"]:
        value = "-" if f["value"] is None else f"{f['value']:.4g}"
        detail = ", ".join(f"{k}={v}" for k, v in f["detail"].items())
        print(f"{f['figure']:<48} {value:>10}  {detail}")


if __name__ == "__main__":
    raise SystemExit(main())
