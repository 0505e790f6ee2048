"""Reference implementations written without our code, for fidelity tests and benchmarks.

`demucs_reference` is what demucs itself does with the stored files (get_model, the CLI's
normalisation, apply_model); `mdx_reference` is a plain STFT -> ONNX -> inverse-STFT loop.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipelines.families.demucs_family import signature
from pipelines.modelstore import ModelStore
from pipelines.registry import get_spec


def demucs_reference(store: ModelStore, model_id: str, mix: np.ndarray, tmp: Path,
                     segment: float | None = None, overlap: float | None = None) -> dict[str, np.ndarray]:
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
        out = apply_model(model, ((wav - mean) / std)[None], segment=segment, overlap=overlap, shifts=0,
                          split=True, device="cpu", num_workers=0, progress=False)
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
    spec = np.stack([np.fft.rfft(x[:, f * hop:f * hop + n_fft] * window, axis=-1) for f in range(n_frames)], axis=-1)
    spec = spec[:, :dim_f]  # (channels, dim_f, frames)

    weights = np.hanning(length + 2)[1:-1]
    est = np.zeros((n_out, channels, dim_f, n_frames), complex)
    norm = np.zeros(n_frames)
    start = 0
    while True:
        seg = np.zeros((channels, dim_f, length), complex)
        k = min(length, n_frames - start)
        seg[..., :k] = spec[..., start:start + k]
        net_in = np.stack([seg.real, seg.imag], axis=1).reshape(1, 2 * channels, dim_f, length)
        net_in[:, :, :3] = 0.0  # UVR zeroes the three lowest bins
        out = session.run(None, {session.get_inputs()[0].name: net_in.astype(np.float32)})[0]
        out = out.reshape(n_out, channels, 2, dim_f, length).astype(np.float64)
        y = out[:, :, 0] + 1j * out[:, :, 1]
        if p.get("output") == "mask":
            y = y * seg
        est[..., start:start + k] += y[..., :k] * weights[:k]
        norm[start:start + k] += weights[:k]
        if start + length >= n_frames:
            break
        start += step
    est /= norm

    y = np.zeros((n_out, channels, n + n_fft))
    env = np.zeros(n + n_fft)
    for f in range(n_frames):
        full = np.zeros((n_out, channels, n_fft // 2 + 1), complex)
        full[..., :dim_f] = est[..., f]
        y[..., f * hop:f * hop + n_fft] += np.fft.irfft(full, n=n_fft, axis=-1) * window
        env[f * hop:f * hop + n_fft] += window ** 2
    inside = slice(n_fft // 2, n_fft // 2 + n)
    return y[..., inside] / env[inside]
