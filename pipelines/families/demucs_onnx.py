"""Demucs networks on ONNX Runtime: the part between the STFT and the iSTFT, exported once per checkpoint.

Why: on a CPU, ONNX Runtime's kernels run the full-size htdemucs network in about half the
time torch's take (docs/benchmarks.md, Performance: torch's matrix products go through MKL, which on
the AMD benchmark machine reached half of what ONNX Runtime's MLAS did), and the outputs
stay within float rounding of torch's. The STFT and iSTFT stay in torch: complex tensors
do not export, and they are a small share of the time.

What the file holds: `HTDemucs.forward` (and `HDemucs.forward`) from the spectrogram to the
estimate, traced through demucs's own forward with `_spec`, `_magnitude`, `_mask` and
`_ispec` stood in for, so no demucs code is copied and the graph is demucs's arithmetic op
for op. Inputs: `mix` (batch, channels, samples), the segment as the network sees it, and
`mag`, the spectrogram as real channels (what `_magnitude` returns). Outputs: `spec`, what
`_mask` receives, and `wave`, the time branch already denormalised. `CoreRunner` puts the
model's forward back together around a session: `_spec`, `_magnitude`, the graph, `_mask`,
`_ispec`, and the sum of the two branches.

A graph has one segment length (shapes inside are traced as constants): the length every
full segment runs at. A segment of another length (hdemucs's shorter last one) runs in torch.

The file is derived deterministically from verified weights and cached in the model store
under `derived/demucs-onnx/`, named by the checkpoint's sha256, the segment length and the
exporter (format, torch, demucs). A sidecar json pins the file's sha256, checked on every
load as weights are, and records the largest difference from torch that a check on seeded
noise found when it was built; a build that differs by more than `CHECK_TOLERANCE` is
refused, so the fast path can never change a stem beyond that bound unnoticed.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from demucs.hdemucs import HDemucs
from demucs.htdemucs import HTDemucs

from ..errors import ChainError
from ..modelstore import sha256_file

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what the exported file holds changes: old files are then rebuilt, never reused
OPSET = 17
DERIVED = Path("derived") / "demucs-onnx"
# Largest max abs difference from torch allowed on the build check: the bound we promise on
# stems. The check runs on seeded noise at the normalised scale the network sees; a stem is
# that output times the track's std (<= 1 for audio in [-1, 1]). Measured: 8e-5 for the
# full-size random htdemucs, about 2e-6 for the small test models.
CHECK_TOLERANCE = 1e-3
_SPECTRAL = ("_spec", "_magnitude", "_mask", "_ispec")


def runtime_missing() -> str | None:
    """Why ONNX Runtime cannot serve here, or None."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install onnxruntime onnx)"
    return None


def exportable(model: Any, explicit: bool = False) -> str | None:
    """Why `model` does not run here by default (or at all, when `explicit`), or None.

    HTDemucs exports and was measured. A hybrid HDemucs (hdemucs_mmi) exports too, LSTMs and
    local attention included, but its check on noise differs from torch by about 3e-4 and its
    speed was never measured, so it runs on ONNX Runtime only when asked for (params.backend).
    """
    if isinstance(model, HTDemucs):
        return None
    if isinstance(model, HDemucs) and model.hybrid:
        return None if explicit else "HDemucs runs in torch unless params.backend is 'onnxruntime'"
    return f"{type(model).__name__} (hybrid={getattr(model, 'hybrid', None)}) has no exported form"


def network_length(model: Any, padded: int) -> int:
    """The samples the network itself runs at for a segment padded to `padded` (HTDemucs pads to its training length)."""
    if isinstance(model, HTDemucs) and model.use_train_segment:
        return max(padded, int(model.segment * model.samplerate))
    return padded


class _Core(torch.nn.Module):
    """demucs's forward from `mag` to (`spec`, `wave`): the spectral methods stood in for while it is traced."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, mix: torch.Tensor, mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        spectrogram: list[torch.Tensor] = []

        # the estimate's spectrogram leaves the graph; the iSTFT is added back outside
        def keep(z: torch.Tensor, length: int) -> int:
            spectrogram.append(z)
            return 0

        stand_ins = {"_spec": lambda x: mag, "_magnitude": lambda z: z, "_mask": lambda z, out: out, "_ispec": keep}
        for name, fn in stand_ins.items():
            setattr(m, name, fn)  # instance attributes shadow the methods for this call only
        try:
            wave = m(mix)  # the time branch, denormalised, plus the int 0 that `keep` returned
        finally:
            for name in stand_ins:
                delattr(m, name)
        return spectrogram[0], wave


def _spectrogram(model: Any, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = model._spec(mix)
    return z, model._magnitude(z)


def export(model: Any, length: int, path: Path) -> None:
    """Write `model`'s network at `length` samples to `path` (ONNX, dynamic batch)."""
    mix = torch.zeros(1, model.audio_channels, length)
    with torch.inference_mode():
        _, mag = _spectrogram(model, mix)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # the fused attention kernel has no ONNX form; the unfused path is the same arithmetic
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shapes taken as constants: that is the intent
            torch.onnx.export(
                _Core(model.eval()),
                (mix, mag),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=["mix", "mag"],
                output_names=["spec", "wave"],
                dynamic_axes={n: {0: "batch"} for n in ("mix", "mag", "spec", "wave")},
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    _bool_eye_as_float(path)


def _bool_eye_as_float(path: Path) -> None:
    """Rewrite boolean EyeLike nodes (demucs's LocalState masks with `torch.eye(T, dtype=bool)`), which
    ONNX Runtime does not implement, as a float EyeLike between casts: the same mask."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}

    def is_bool(node: onnx.NodeProto) -> bool:
        dtype: int | None = next((a.i for a in node.attribute if a.name == "dtype"), None)
        if dtype is not None:
            return dtype == TensorProto.BOOL
        source = producers.get(node.input[0])  # without dtype the output has the input's type
        value = next((a.t for a in source.attribute if a.name == "value"), None) if source is not None else None
        return (
            source is not None
            and source.op_type == "ConstantOfShape"
            and value is not None
            and value.data_type == TensorProto.BOOL
        )

    nodes, changed = [], False
    for node in model.graph.node:
        if node.op_type == "EyeLike" and is_bool(node):
            for a in [a for a in node.attribute if a.name == "dtype"]:
                node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("dtype", TensorProto.FLOAT))
            source, out = node.input[0], node.output[0]
            node.input[0], node.output[0] = source + "_float", out + "_float"
            nodes += [
                helper.make_node(
                    "Cast", [source], [source + "_float"], to=TensorProto.FLOAT, name=node.name + "_from_bool"
                ),
                node,
                helper.make_node("Cast", [out + "_float"], [out], to=TensorProto.BOOL, name=node.name + "_to_bool"),
            ]
            changed = True
        else:
            nodes.append(node)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))


def _session(path: Path, threads: int, save_optimized: Path | None = None) -> Any:  # an ort.InferenceSession
    """An ONNX Runtime CPU session on `path`; with `save_optimized`, also write the optimised graph there.

    The file kept in the store is the graph after ONNX Runtime's portable ("extended") fusions,
    so a cold process skips them (1.9 s to 0.8 s for the full-size htdemucs); the layout passes
    that depend on the processor still run at load. Threads do not spin while waiting for work:
    on a shared 2-core machine spinning took a core from the neighbours and from our own
    STFT, for no gain on an idle one (docs/benchmarks.md, Performance).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if save_optimized is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(save_optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class CoreRunner:
    """One exported network in an ONNX Runtime session: `model(mix)` for mixes of its length."""

    def __init__(self, model: Any, path: Path, length: int, threads: int) -> None:
        self.model, self.length = model, length
        self.session = _session(path, threads)

    def accepts(self, mix: torch.Tensor) -> bool:
        return network_length(self.model, mix.shape[-1]) == self.length

    @torch.inference_mode()
    def __call__(self, mix: torch.Tensor) -> torch.Tensor:
        """As `model(mix)`; `accepts(mix)` must hold."""
        m, length = self.model, mix.shape[-1]
        if length < self.length:  # as HTDemucs.forward pads a short segment to its training length
            mix = F.pad(mix, (0, self.length - length))
        z, mag = _spectrogram(m, mix)
        spec, wave = self.session.run(None, {"mix": mix.numpy(), "mag": mag.numpy()})
        x = m._ispec(m._mask(z, torch.from_numpy(spec)), self.length)
        out: torch.Tensor = torch.from_numpy(wave) + x  # demucs adds xt + x: the same sum
        return out[..., :length] if length < self.length else out


def _versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "demucs": importlib.metadata.version("demucs"),
        "onnxruntime": importlib.metadata.version("onnxruntime"),
    }  # the kept graph holds its fused operators


def artefact_paths(root: Path, weights_sha256: str, length: int) -> tuple[Path, Path]:
    """(onnx file, sidecar json) of one checkpoint's network at `length` under the store `root`."""
    v = _versions()
    stem = f"{weights_sha256[:32]}-{length}-f{FORMAT}-torch{v['torch']}-demucs{v['demucs']}-ort{v['onnxruntime']}"
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)
    return root / DERIVED / f"{stem}.onnx", root / DERIVED / f"{stem}.json"


def _check(model: Any, runner: CoreRunner) -> float:
    """Max abs difference between torch's forward and the runner's on one segment of seeded noise."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(1, model.audio_channels, runner.length, generator=g)
    with torch.inference_mode():
        return float((model(mix) - runner(mix)).abs().max())


def _valid(onnx_path: Path, sidecar: Path, weights_sha256: str) -> bool:
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("weights_sha256") == weights_sha256
        and onnx_path.exists()
        and meta.get("onnx_sha256") == sha256_file(onnx_path)
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (other worker processes building the same file wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared_runner(
    model: Any, root: Path, weights_sha256: str, length: int, threads: int, build: bool = True
) -> CoreRunner:
    """A runner for `model` at `length` from the store's derived file, built first when missing or stale.

    Raises ChainError (naming why) when the file is missing and `build` is False, or when the
    exported network differs from torch by more than CHECK_TOLERANCE.
    """
    onnx_path, sidecar = artefact_paths(root, weights_sha256, length)
    if not _valid(onnx_path, sidecar, weights_sha256):
        if not build:
            raise ChainError(
                f"no ONNX Runtime file at {onnx_path}; `stems models install` builds it", file=str(onnx_path)
            )
        with _locked(onnx_path.with_suffix(".lock")):
            if not _valid(onnx_path, sidecar, weights_sha256):  # another process may have built it meanwhile
                _build(model, onnx_path, sidecar, weights_sha256, length, threads)
    return CoreRunner(model, onnx_path, length, threads)


def _build(model: Any, onnx_path: Path, sidecar: Path, weights_sha256: str, length: int, threads: int) -> None:
    t0 = time.perf_counter()
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=onnx_path.parent, prefix=".build-", suffix=".onnx")
    os.close(fd)
    tmp, exported = Path(tmp_name), Path(tmp_name).with_suffix(".exported.onnx")
    try:
        export(model, length, exported)
        _session(exported, threads, save_optimized=tmp)
        exported.unlink()
        difference = _check(model, CoreRunner(model, tmp, length, threads))
        if not difference <= CHECK_TOLERANCE:  # also refuses NaN
            raise ChainError(
                f"the ONNX export of {type(model).__name__} differs from torch by {difference:.3g} "
                f"(> {CHECK_TOLERANCE:g}); use params.backend 'torch'",
                difference=difference,
                tolerance=CHECK_TOLERANCE,
            )
        meta = {
            "format": FORMAT,
            "weights_sha256": weights_sha256,
            "length": length,
            "opset": OPSET,
            "onnx_sha256": sha256_file(tmp),
            "check_max_abs_difference": difference,
            **_versions(),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        tmp.chmod(0o644)  # mkstemp's 0600 would hide it from workers running as another user
        os.replace(tmp, onnx_path)
        side_tmp = sidecar.with_suffix(".json.part")
        side_tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(side_tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
        exported.unlink(missing_ok=True)
    log.info("built %s in %.1f s (max abs difference from torch %.2g)", onnx_path, time.perf_counter() - t0, difference)
