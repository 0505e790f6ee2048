"""Randomly initialised stand-ins for the Demucs checkpoints we cannot ship, saved in Demucs's own format.

The released Demucs weights cannot be had offline, so tests and benchmarks run the real
loading and separation code on models of the released architecture (`size="full"`, for
timings and memory) or of the same architecture with tiny channel counts (`size="small"`,
for fast tests through the same code paths). Files get the names the registry expects
(`pipelines/catalogue/models/demucs.json`) and hold the package `demucs.states.serialize_model`
builds (klass, args, kwargs, half-precision state, training_args), so `demucs.states.load_model`
reads them. Their weights are random: the outputs are noise-like and do not sum to the mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Literal

import torch
import yaml
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs
from demucs.states import get_state

from pipelines.families.demucs_family import signature
from pipelines.modelstore import ModelStore
from pipelines.registry import get_spec

Size = Literal["small", "narrow", "full"]

# Released architectures (see shared/models/README.md); everything else is the class default.
_FULL: dict[str, tuple[type, dict]] = {
    "htdemucs": (
        HTDemucs,
        dict(depth=4, dconv_mode=3, dconv_comp=8, bottom_channels=512, t_layers=5, segment=Fraction(39, 5)),
    ),
    "htdemucs_6s": (HTDemucs, dict(depth=4, dconv_mode=3, dconv_comp=8, t_layers=5, segment=Fraction(39, 5))),
    "hdemucs_mmi": (HDemucs, dict(depth=6, channels=48, dconv_mode=1, dconv_attn=4, dconv_lstm=4, segment=44)),
}
_FULL["htdemucs_ft"] = _FULL["htdemucs"]
_FULL["drumsep_5"] = _FULL["htdemucs"]  # its released architecture is not documented: assume htdemucs's

# Same layers and code paths (bottom projection, both kinds of transformer layer, DConv LSTM and
# attention) with a few channels, and short segments so a test runs several of them.
_SMALL: dict[str, dict] = {
    "htdemucs": dict(channels=8, bottom_channels=16, t_layers=2, t_heads=2, segment=Fraction(2)),
    "htdemucs_6s": dict(channels=8, t_layers=2, t_heads=2, segment=Fraction(2)),
    "hdemucs_mmi": dict(channels=8, segment=2),
}
_SMALL["htdemucs_ft"] = _SMALL["htdemucs"]
_SMALL["drumsep_5"] = _SMALL["htdemucs"]

# The released architecture (depth, layers, 7.8 s segments, five transformer layers, eight heads)
# with 8 channels instead of 48 and a transformer 64 wide instead of 512 (0.8M parameters, not
# 42M): hour-long memory runs on the same segment grid and code paths in a fraction of the compute.
_NARROW: dict[str, dict] = {"htdemucs": dict(channels=8, bottom_channels=64)}


def demucs_architecture(model_id: str, size: Size = "small") -> tuple[type, dict]:
    """The Demucs class and constructor kwargs of a stand-in for `model_id`."""
    spec = get_spec(model_id)
    if spec.family != "demucs" or model_id not in _FULL:
        raise ValueError(f"no random stand-in for {model_id!r}; known: {sorted(_FULL)}")
    if size not in ("small", "narrow", "full"):
        raise ValueError(f"size must be 'small', 'narrow' or 'full', not {size!r}")
    if size == "narrow" and model_id not in _NARROW:
        raise ValueError(f"no narrow stand-in for {model_id!r}; known: {sorted(_NARROW)}")
    klass, kwargs = _FULL[model_id]
    kwargs = {**kwargs, **{"small": _SMALL, "narrow": _NARROW, "full": {}}[size].get(model_id, {})}
    return klass, {
        **kwargs,
        "sources": list(spec.sources),
        "audio_channels": spec.channels,
        "samplerate": spec.sample_rate,
    }


def _package(model_id: str, size: Size, seed: int) -> dict:
    """What `demucs.states.serialize_model` returns, without its omegaconf dependency."""
    klass, kwargs = demucs_architecture(model_id, size)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        model = klass(**kwargs)
    args, kw = model._init_args_kwargs  # set by demucs's @capture_init, as serialize_model reads it
    return {
        "klass": klass,
        "args": args,
        "kwargs": kw,
        "state": get_state(model, None, half=True),  # released checkpoints are stored in half precision
        "training_args": {"random_stand_in": {"model_id": model_id, "size": size, "seed": seed}},
    }


def make_random_demucs(model_id: str, out_dir: Path, size: Size = "small", seed: int = 0) -> list[Path]:
    """Write a random stand-in for `model_id` into `out_dir`, named as the registry expects.

    A bag (htdemucs_ft) gets one checkpoint per member (seeds `seed`, `seed + 1`, ...) and a
    yaml listing their signatures with the released bag's weights (member k serves source k).
    """
    spec = get_spec(model_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = [f for f in spec.files if f.endswith(".th")]
    bags = [f for f in spec.files if f.endswith(".yaml")]
    written = []
    for k, name in enumerate(checkpoints):
        torch.save(_package(model_id, size, seed + k), out_dir / name)
        written.append(out_dir / name)
    for name in bags:
        n = len(checkpoints)
        bag = {"models": [signature(f) for f in checkpoints]}
        if n == len(spec.sources):  # one specialist per source, as in the released htdemucs_ft.yaml
            bag["weights"] = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
        (out_dir / name).write_text(yaml.safe_dump(bag, default_flow_style=None))
        written.append(out_dir / name)
    return sorted(written, key=lambda p: spec.files.index(p.name))


def install_random_demucs(
    store: ModelStore,
    model_id: str,
    size: Size = "small",
    seed: int = 0,
    params: dict | None = None,
    share_derived: bool = True,
) -> list[Path]:
    """Make a random stand-in for `model_id` and install it into `store`; returns the installed files.

    With `share_derived`, the store also gets the files the demucs family derives from these
    weights (ONNX Runtime graphs), built once per stand-in and copied from DERIVED_CACHE after
    that (see `_share_derived`); without it, they are built on first use as in a fresh store.
    """
    with tempfile.TemporaryDirectory(prefix="random_demucs_") as tmp:
        store.install(model_id, make_random_demucs(model_id, Path(tmp), size, seed), params=params)
    if share_derived:
        _share_derived(store, model_id)
    return [store.root / name for name in get_spec(model_id).files]


# A stand-in of one model, size and seed always has the same weights, so the same derived files
# (they are named by the weights' sha256 and checked against it on load). A test suite builds
# each once, here, instead of once per store it makes.
DERIVED_CACHE = Path(tempfile.gettempdir()) / f"stems-random-demucs-derived-{os.getuid()}"


def _share_derived(store: ModelStore, model_id: str) -> None:
    from pipelines.families import demucs_onnx

    entry = store.entry(model_id) or {}
    shas = [sha for name, sha in entry.get("files", {}).items() if name.endswith(".th")]
    target = store.root / demucs_onnx.DERIVED
    cached = {sha: sorted(DERIVED_CACHE.glob(f"{sha[:32]}-*.onnx")) for sha in shas}
    if not all(cached.values()):
        if _FULL[model_id][0] is not HTDemucs:  # "auto" runs HDemucs in torch: nothing to share
            return
        # built by a separator that asks for ONNX Runtime, whichever backend this CPU's figures choose for "auto"
        spec = get_spec(model_id)
        sep = spec.separator_class()(spec, store.resolve(spec), {**store.params_for(spec), "backend": "onnxruntime"})
        try:
            sep.setup("cpu")
        except Exception:
            return
        if getattr(sep, "backend", None) == "onnxruntime":
            _copy(
                [p for sha in shas for p in target.glob(f"{sha[:32]}-*") if p.suffix in (".onnx", ".json")],
                DERIVED_CACHE,
            )
        return
    _copy([f for files in cached.values() for p in files for f in (p, p.with_suffix(".json")) if f.exists()], target)


def _copy(paths: list[Path], to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for p in sorted(paths, key=lambda p: p.suffix != ".onnx"):  # each graph before its sidecar
        tmp = to / f".{p.name}.{os.getpid()}.part"
        shutil.copyfile(p, tmp)
        os.replace(tmp, to / p.name)
