"""Check `tools.reference.roformer_reference` and the roformer family against the real MSST inference, run beside the project.

Not part of the test suite: it needs a checkout of ZFTurbo/Music-Source-Separation-Training
(MSST) and the packages its inference imports that we do not install (ml_collections,
omegaconf), neither of which CI has. Usage:

    python -m tools.msst_check --msst /path/to/Music-Source-Separation-Training [--extra /path/to/site] [--size bench]

For random stand-ins of several registry entries (tools/roformer_models.py) it runs MSST's own
code on the stored files: `utils.settings.get_model_from_config` (MSST's copy of the model
classes), `utils.model_utils.load_start_checkpoint`, `demix`, and inference.py's
`normalize_audio` / `denormalize_audio` when the config normalises. It prints the largest
absolute difference of each output from the reference in tools/ and from our family
(`Engine.run_model`). MSST's model classes and ours are different code (its copy, the
package's), so this also checks that the package's classes plus our handling of MSST's keys
(zero_dc, mlp_expansion_factor) compute MSST's model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

SR = 44100


def _msst(msst: Path, extra: list[str]):
    """Import MSST's inference modules from a checkout (matplotlib stubbed: only its spectrogram drawing needs it)."""
    sys.path[:0] = [str(msst), *extra]
    if "matplotlib" not in sys.modules:
        plt = types.ModuleType("matplotlib.pyplot")
        sys.modules["matplotlib"] = types.ModuleType("matplotlib")
        sys.modules["matplotlib.pyplot"] = plt
    from utils.audio_utils import denormalize_audio, normalize_audio
    from utils.model_utils import demix, load_start_checkpoint
    from utils.settings import get_model_from_config

    return get_model_from_config, load_start_checkpoint, demix, normalize_audio, denormalize_audio


def msst_inference(mod, arch: str, config: Path, checkpoint: Path, mix: np.ndarray) -> dict[str, np.ndarray]:
    """What MSST's inference.py computes for one mix (run_folder without its file reading and writing)."""
    import torch

    get_model_from_config, load_start_checkpoint, demix, normalize_audio, denormalize_audio = mod
    model, cfg = get_model_from_config(arch, str(config))
    args = types.SimpleNamespace(start_check_point=str(checkpoint), model_type=arch, lora_checkpoint_loralib=None)
    load_start_checkpoint(
        args, model, torch.load(checkpoint, weights_only=False, map_location="cpu"), type_="inference"
    )
    model.eval()
    normalize = "normalize" in cfg.inference and cfg.inference["normalize"] is True
    x, params = normalize_audio(mix) if normalize else (mix, None)
    out = demix(cfg, model, x, "cpu", arch, pbar=False)
    return {k: denormalize_audio(v, params) if normalize else v for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--msst", required=True, type=Path, help="a Music-Source-Separation-Training checkout")
    ap.add_argument("--extra", action="append", default=[], help="a directory with ml_collections and omegaconf")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument(
        "--size",
        choices=("small", "bench"),
        default="small",
        help="stand-in size (tools/roformer_models.py); bench: the released 8 s chunk grid",
    )
    args = ap.parse_args()

    import torch

    from pipelines.engine import Engine
    from pipelines.modelstore import ModelStore
    from pipelines.registry import get_spec
    from tools.reference import roformer_reference
    from tools.roformer_models import install_random_roformer, msst_outputs, roformer_config

    torch.set_num_threads(1)
    mod = _msst(args.msst, args.extra)
    rng = np.random.default_rng(7)
    cases = [  # (model id, config changes, length in seconds)
        ("bs_roformer_viperx_1297", {}, args.seconds),
        ("bs_roformer_4stem", {"model": {"mlp_expansion_factor": 2}}, args.seconds),
        ("mel_band_roformer_kj", {}, args.seconds),
        ("mel_band_roformer_karaoke", {"inference": {"batch_size": 1, "num_overlap": 4}}, args.seconds),
        (
            "mel_band_roformer_dereverb",
            {"inference": {"batch_size": 3, "num_overlap": 2, "normalize": True}},
            args.seconds,
        ),
        (
            "bs_roformer_viperx_1297",
            {"inference": {"batch_size": 4, "num_overlap": 2}},
            args.seconds / 10,
        ),  # < 2 borders
        ("mel_band_roformer_kj", {"model": {"zero_dc": False}}, args.seconds),
    ]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for n, (model_id, changes, seconds) in enumerate(cases):
            config = roformer_config(model_id, args.size)
            for section, values in changes.items():
                config[section].update(values)
            store = ModelStore(Path(tmp) / f"store{n}")
            install_random_roformer(store, model_id, seed=n, config=config)
            mix = (0.1 * rng.standard_normal((2, int(seconds * SR)))).astype(np.float32)
            p = get_spec(model_id).params
            theirs = msst_inference(mod, p["arch"], store.root / p["config"], store.root / p["checkpoint"], mix)
            targets, _ = msst_outputs(model_id)
            names = p.get("sources", {})
            ref = roformer_reference(store, model_id, mix)
            ours = Engine(store).run_model(model_id, mix, SR)
            d_ref = max(float(np.abs(theirs[t] - ref[names.get(t, t)]).max()) for t in targets)
            d_ours = max(float(np.abs(theirs[t] - ours[names.get(t, t)]).max()) for t in targets)
            peak = max(float(np.abs(theirs[t]).max()) for t in targets)
            worst = max(worst, d_ref, d_ours)
            print(
                f"{model_id:28} {str(changes):70} |MSST| {peak:.3f}  MSST-reference {d_ref:.2e}  MSST-ours {d_ours:.2e}"
            )
    print(f"largest difference: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
