"""Chunked (streaming) separation equals whole-signal separation; silence and cancellation are honoured."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("demucs")

from pipelines import audio as A, signals as S  # noqa: E402
from pipelines.engine import Engine  # noqa: E402
from pipelines.errors import Cancelled  # noqa: E402
from pipelines.families.base import Separator, chunked  # noqa: E402
from pipelines.modelstore import ModelStore  # noqa: E402
from pipelines.registry import get_spec  # noqa: E402
from tools.random_models import install_random_demucs  # noqa: E402
from tools.reference import demucs_reference  # noqa: E402

SR = 44100
TOL = 1e-4  # the brief's bound; the Demucs path lands near 3e-8 (only the normalisation statistics differ)


@pytest.fixture(scope="module")
def mix() -> np.ndarray:
    """5.3 s of stereo noise: small models' 2 s segments (1.5 s apart) make four, the last one short, and the
    chunk sizes below make two chunks and fifteen blocks."""
    return (0.1 * np.random.default_rng(1).standard_normal((2, int(5.3 * SR)))).astype(np.float32)


def _diff(ours: dict, theirs: dict) -> float:
    assert sorted(ours) == sorted(theirs)
    return max(float(np.abs(np.asarray(ours[s]) - theirs[s]).max()) for s in ours)


# model id, store params (None: the registry's), chunk sizes in seconds
CASES = [
    ("htdemucs", None),
    ("htdemucs_ft", None),  # a bag: members side by side, combined by the bag's weights
    ("hdemucs_mmi", {"segment": 2}),  # HDemucs: no training-length padding, short last segment
    ("htdemucs", {"segment": 1.2, "batch": 3}),  # batched segments, a custom segment
]


@pytest.mark.parametrize("model_id, params", CASES)
def test_streamed_demucs_equals_whole_track_apply_model(model_id, params, mix, tmp_path):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, model_id, params=params)
    expected = demucs_reference(store, model_id, mix, tmp_path / "ref", segment=(params or {}).get("segment"))
    for chunk_seconds in (100.0, 2.9, 0.37):
        engine = Engine(store, chunk_seconds=chunk_seconds)
        assert _diff(engine.run_model(model_id, mix, SR), expected) <= TOL, chunk_seconds
        # the same through files on disk, as the worker runs it
        wrote = engine.stream_model(model_id, S.ArraySignal(mix), SR, tmp_path)
        assert all(isinstance(s, S.FrameFile) for s in wrote.values())
        assert _diff({k: v.to_array() for k, v in wrote.items()}, expected) <= TOL


def test_streamed_resampling_equals_whole_signal_resampling(tmp_path):
    """A 48 kHz mono source: resampled to 44.1 kHz stereo and back in blocks, as a whole-array run would."""
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs")
    source = (0.1 * np.random.default_rng(2).standard_normal((1, int(7.1 * 48000)))).astype(np.float32)
    model_in = S.to_channels(A.resample(source, 48000, SR), 2)
    ref = demucs_reference(store, "htdemucs", model_in, tmp_path / "ref")
    expected = {s: S.to_channels(A.resample(y, SR, 48000), 1)[:, : source.shape[1]] for s, y in ref.items()}
    for chunk_seconds in (100.0, 1.1):
        out = Engine(store, chunk_seconds=chunk_seconds).stream_model(
            "htdemucs", S.ArraySignal(source), 48000, tmp_path / "work" if chunk_seconds < 10 else None
        )
        got = {s: v.to_array() for s, v in out.items()}
        assert all(y.shape == source.shape for y in got.values())
        assert _diff(got, expected) <= TOL


def test_silent_segments_are_not_run_and_come_out_silent(tmp_path):
    store = ModelStore(tmp_path / "store")
    # torch: the hook below counts torch forwards (the segment walk that skips silence is the same on ONNX Runtime)
    install_random_demucs(store, "htdemucs", params={"backend": "torch"})
    audio = (0.1 * np.random.default_rng(3).standard_normal((2, 12 * SR))).astype(np.float32)
    audio[:, 3 * SR : 9 * SR] = 0.0  # digital silence longer than two 2 s segments
    engine = Engine(store, chunk_seconds=1.0)
    sep = engine.separator("htdemucs")
    forwards = []
    model = sep.model
    sep.model.register_forward_hook(lambda *a: forwards.append(1))
    out = engine.run_model("htdemucs", audio, SR)
    # the small model's segments: 2 s at a 1.5 s stride, 8 of them over 12 s; those wholly in silence are skipped
    assert 0 < len(forwards) < 8
    for y in out.values():
        assert np.max(np.abs(y[:, int(4.6 * SR) : int(7.4 * SR)])) < 1e-6
    assert model is sep.model


def test_silent_input_loads_no_model(tmp_path):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs")
    engine = Engine(store)
    out = engine.run_model("htdemucs", np.zeros((2, SR), np.float32), SR)
    assert engine.loads == 0 and all(not y.any() for y in out.values())


def test_cancel_between_segments(tmp_path, mix):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs")
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(Cancelled):
        Engine(store, chunk_seconds=1.0).run_model("htdemucs", mix, SR, cancelled=cancelled)


def test_random_shifts_fall_back_to_the_whole_signal(tmp_path, mix):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs", params={"shifts": 1})
    sep = Engine(store).separator("htdemucs")
    blocks = list(sep.stream(S.ArraySignal(mix), SR, SR, lambda: False))
    assert len(blocks) == 1 and blocks[0]["vocals"].shape == mix.shape  # one block: the whole track


class _MovingAverage(Separator):
    """A method whose output at t depends on the input within 0.25 s: exact when chunked with that context."""

    def stream(self, audio: S.Signal, sample_rate: int, block: int, cancelled) -> Iterator[dict[str, np.ndarray]]:
        return chunked(self, audio, sample_rate, block, 0.25, cancelled)

    def separate(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        k = int(0.25 * sample_rate)
        kernel = np.ones(2 * k + 1, np.float64) / (2 * k + 1)
        smooth = np.stack([np.convolve(c.astype(np.float64), kernel, mode="same") for c in audio]).astype(np.float32)
        return {"harmonic": smooth, "percussive": (audio - smooth).astype(np.float32)}


def test_context_chunking_of_streamable_methods_equals_whole(tmp_path):
    """The step contract's `chunked` helper: chunks plus their context each side, through files, equal one whole run."""
    spec = get_spec("dsp.hpss")  # any id with sources (harmonic, percussive), any rate and channel count
    audio = (0.2 * np.random.default_rng(4).standard_normal((2, 10 * 8000))).astype(np.float32)
    whole = _MovingAverage(spec, {}, {}).separate(audio, 8000)
    for chunk_seconds, workdir in ((1.0, tmp_path), (3.0, None)):
        engine = Engine(ModelStore(tmp_path / "store"), chunk_seconds=chunk_seconds)
        engine._warm[spec.id] = _MovingAverage(spec, {}, {})
        out = engine.stream_model(spec.id, S.ArraySignal(audio), 8000, workdir)
        assert _diff({k: v.to_array() for k, v in out.items()}, whole) <= 1e-6


# params.precision bfloat16 on a CPU (autocast): the bound on its distance from float32, as the SDR of
# the bfloat16 output against the float32 output, worst stem, on the random htdemucs. bfloat16 keeps
# 8 bits of mantissa, so about 48 dB per operation; the small random model measured 46.6 dB (worst
# stem "other", AMD EPYC with AVX512-BF16, torch 2.13).
BF16_WORST_STEM_DB = 30.0


def test_bfloat16_autocast_stays_close_to_float32(tmp_path, mix):
    """precision bfloat16 runs the forward in bfloat16 on the CPU, within BF16_WORST_STEM_DB of float32; off by default."""
    from pipelines.errors import ChainError

    ref = ModelStore(tmp_path / "fp32")
    install_random_demucs(ref, "htdemucs")
    bf16 = ModelStore(tmp_path / "bf16")
    install_random_demucs(bf16, "htdemucs", params={"precision": "bfloat16"})
    default, lowered = Engine(ref), Engine(bf16)
    a = default.run_model("htdemucs", mix, SR)
    b = lowered.run_model("htdemucs", mix, SR)
    assert default.separator("htdemucs").precision == "float32"  # off unless asked for
    sep = lowered.separator("htdemucs")
    assert sep.precision == "bfloat16" and sep.backend == "torch" and sep.fallbacks == 0
    sdr = {s: 10 * np.log10(np.sum(a[s] ** 2) / np.sum((a[s] - b[s]) ** 2)) for s in a}
    worst = min(sdr, key=sdr.get)
    print(f"bfloat16 against float32, worst stem {worst}: {sdr[worst]:.1f} dB")
    assert sdr[worst] > BF16_WORST_STEM_DB, sdr
    assert sdr[worst] < 80, "no bfloat16 rounding seen: autocast did not lower the forward"
    fp16 = ModelStore(tmp_path / "fp16")
    install_random_demucs(fp16, "htdemucs", params={"precision": "float16"})
    with pytest.raises(ChainError, match="CUDA"):
        Engine(fp16).separator("htdemucs")
