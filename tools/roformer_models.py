"""Randomly initialised stand-ins for the RoFormer checkpoints we cannot ship, saved as Music-Source-Separation-Training saves them.

The published BS-RoFormer and Mel-Band RoFormer weights cannot be had offline, so tests and
benchmarks run the real loading and separation code on models built by the `bs-roformer`
package with random weights, written as MSST writes a checkpoint (`torch.save` of the state
dict) beside a YAML config in MSST's layout (audio / model / training / inference), under
the file names the registry expects (`pipelines/catalogue/models/roformer.json`). The
config's outputs follow the registry entry: its targets are the non-residual sources, under
the first config name `params.sources` maps to each. Sizes:
- `small`: dim 16, one block, 512-point STFT, 32768-sample chunks: fast tests of every path;
- `bench`: the same layers with the released 2048-point STFT, hop 441 and 8-second chunks,
  so memory follows the real chunk grid (`bench/stream_memory.py`).
Their weights are random: the outputs are noise-like.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
import yaml

from pipelines.modelstore import ModelStore
from pipelines.registry import get_spec

Size = Literal["small", "bench"]

_STFT = {
    "small": dict(stft_n_fft=512, stft_hop_length=128, stft_win_length=512, dim_freqs_in=257),
    "bench": dict(stft_n_fft=2048, stft_hop_length=441, stft_win_length=2048, dim_freqs_in=1025),
}
_CHUNK = {"small": 128 * 256, "bench": 352800}  # hop multiples; 352800 is the released models' 8 s
_BANDS = {
    "small": (2,) * 8 + (4,) * 8 + (8,) * 4 + (257 - 80,),
    "bench": (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129),
}  # the released split


def msst_outputs(model_id: str) -> tuple[tuple[str, ...], str | None]:
    """(config instrument names of the model's targets, residual source) of a registry roformer entry."""
    spec = get_spec(model_id)
    residual = spec.params.get("residual")
    names = []
    for source in spec.sources:
        if source == residual:
            continue
        aliases = [k for k, v in spec.params.get("sources", {}).items() if v == source]
        names.append(aliases[0] if aliases else source)
    return tuple(names), residual


def roformer_config(model_id: str, size: Size = "small", **model_overrides) -> dict:
    """An MSST config (as a dict) for a random stand-in of `model_id`."""
    spec = get_spec(model_id)
    if spec.family != "roformer":
        raise ValueError(f"{model_id!r} is not a roformer model")
    if size not in _STFT:
        raise ValueError(f"size must be one of {sorted(_STFT)}, not {size!r}")
    targets, residual = msst_outputs(model_id)
    model = dict(
        dim=16,
        depth=1,
        stereo=spec.channels == 2,
        num_stems=len(targets),
        time_transformer_depth=1,
        freq_transformer_depth=1,
        linear_transformer_depth=0,
        dim_head=8,
        heads=2,
        attn_dropout=0.1,
        ff_dropout=0.1,
        flash_attn=True,
        mask_estimator_depth=2,
        **_STFT[size],
    )
    if spec.params["arch"] == "bs_roformer":
        model["freqs_per_bands"] = _BANDS[size]
    else:
        model.update(num_bands=8, sample_rate=spec.sample_rate)
    model.update(model_overrides)
    training = {"instruments": list(targets) + (["other"] if residual else []), "use_amp": True}
    if residual:
        training["target_instrument"] = targets[0]
    return {
        "audio": {
            "chunk_size": _CHUNK[size],
            "num_channels": spec.channels,
            "sample_rate": spec.sample_rate,
            "min_mean_abs": 0.0,
        },
        "model": model,
        "training": training,
        "inference": {"batch_size": 2, "num_overlap": 2},
    }


class _TupleDumper(yaml.SafeDumper):
    """Writes tuples with the `!!python/tuple` tag, as MSST's configs carry freqs_per_bands."""


_TupleDumper.add_representer(tuple, lambda d, t: d.represent_sequence("tag:yaml.org,2002:python/tuple", list(t)))


def make_random_roformer(
    model_id: str, out_dir: Path, size: Size = "small", seed: int = 0, config: dict | None = None
) -> list[Path]:
    """Write a random stand-in (YAML config + state dict) for `model_id` into `out_dir`; returns [config, checkpoint]."""
    from bs_roformer import BSRoformer, MelBandRoformer

    spec = get_spec(model_id)
    config = config or roformer_config(model_id, size)
    cls = BSRoformer if spec.params["arch"] == "bs_roformer" else MelBandRoformer
    kwargs = {
        k: v
        for k, v in config["model"].items()
        if k
        not in (
            "linear_transformer_depth",
            "mlp_expansion_factor",
            "zero_dc",
            "sage_attention",
            "use_torch_checkpoint",
            "skip_connection",
        )
    }
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # leave the caller's random stream alone
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        model = cls(**kwargs)
        factor = config["model"].get("mlp_expansion_factor", 4)
        if factor != 4:  # as MSST's class builds its mask estimators
            from importlib import import_module

            estimator = import_module(cls.__module__).MaskEstimator
            model.mask_estimators = torch.nn.ModuleList(
                estimator(
                    dim=kwargs["dim"],
                    dim_inputs=model.band_split.dim_inputs,
                    depth=kwargs["mask_estimator_depth"],
                    mlp_expansion_factor=factor,
                )
                for _ in range(kwargs.get("num_stems", 1))
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path, ckpt_path = out_dir / spec.params["config"], out_dir / spec.params["checkpoint"]
    config_path.write_text(yaml.dump(config, Dumper=_TupleDumper, sort_keys=False))
    torch.save(model.state_dict(), ckpt_path)  # MSST's save_weights: the bare state dict
    return [config_path, ckpt_path]


def install_random_roformer(
    store: ModelStore,
    model_id: str,
    size: Size = "small",
    seed: int = 0,
    config: dict | None = None,
    params: dict | None = None,
) -> list[Path]:
    """Make a random stand-in for `model_id` and install it into `store`; returns the installed files."""
    with tempfile.TemporaryDirectory(prefix="random_roformer_") as tmp:
        store.install(model_id, make_random_roformer(model_id, Path(tmp), size, seed, config), params=params)
    return [store.root / name for name in get_spec(model_id).files]
