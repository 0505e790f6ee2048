"""The MDX-style ONNX family against a plain reference loop, on small random networks in a real model store."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipelines.engine import Engine
from pipelines.errors import ChainError
from pipelines.modelstore import ModelStore
from pipelines.registry import get_spec
from tools.onnx_models import install_random_onnx
from tools.reference import mdx_reference as reference

SR = 44100
SMALL = dict(n_fft=512, hop=128, dim_f=192, dim_t=32, segment_frames=32, overlap=0.25)
TINY = dict(n_fft=256, hop=64, dim_f=96, dim_t=16, segment_frames=16, overlap=0.25)  # for the 53-source model


def _mix(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 1.5 * t))
    return (tone + 0.05 * rng.standard_normal((2, n))).astype(np.float32)


@pytest.mark.parametrize(
    "model_id, output, params, seconds",
    [
        ("mdx_karaoke", "spectrogram", SMALL, 2.0),
        ("mdx_dereverb", "mask", {**SMALL, "output": "mask"}, 2.0),
        ("mvsep_mega_53", "multi", TINY, 0.5),
    ],
)
def test_engine_matches_reference_loop(tmp_path, model_id, output, params, seconds):
    store = ModelStore(tmp_path)
    install_random_onnx(store, model_id, seed=3, params=params)
    spec = get_spec(model_id)
    audio = _mix(seconds)
    out = Engine(store).run_model(model_id, audio, SR)
    p = store.params_for(spec)
    n_out = len(spec.sources) if output == "multi" else 1
    ref = reference(tmp_path / spec.files[0], audio, p, n_out)
    if output == "multi":
        for i, source in enumerate(spec.sources):
            assert np.max(np.abs(out[source] - ref[i])) < 1e-4, source
    else:
        primary = p["primary"]
        other = next(s for s in spec.sources if s != primary)
        assert np.max(np.abs(out[primary] - ref[0])) < 1e-4
        assert np.max(np.abs(out[other] - (audio - ref[0]))) < 1e-4
    assert all(v.shape == audio.shape and v.dtype == np.float32 for v in out.values())


def test_chunked_equals_whole_and_batches_do_not_matter(tmp_path):
    store = ModelStore(tmp_path / "a")
    install_random_onnx(store, "mdx_karaoke", seed=1, params={**SMALL, "batch_size": 1})
    audio = _mix(3.0, seed=1)
    whole = Engine(store).run_model("mdx_karaoke", audio, SR)
    chunked = Engine(store, chunk_seconds=0.5).run_model("mdx_karaoke", audio, SR)
    other = ModelStore(tmp_path / "b")
    install_random_onnx(other, "mdx_karaoke", seed=1, params={**SMALL, "batch_size": 7})
    batched = Engine(other).run_model("mdx_karaoke", audio, SR)
    for source in whole:
        assert np.max(np.abs(chunked[source] - whole[source])) < 1e-4
        assert np.max(np.abs(batched[source] - whole[source])) < 1e-4


def test_fixed_frame_model_on_audio_shorter_than_a_segment(tmp_path):
    store = ModelStore(tmp_path)
    install_random_onnx(store, "mdx_karaoke", seed=2, params=SMALL, fixed_frames=True)
    audio = _mix(0.05)  # 18 frames, fewer than one 32-frame segment
    out = Engine(store).run_model("mdx_karaoke", audio, SR)
    ref = reference(tmp_path / "UVR_MDXNET_KARA_2.onnx", audio, store.params_for(get_spec("mdx_karaoke")), 1)
    assert np.max(np.abs(out["lead_vocals"] - ref[0])) < 1e-4


def test_identity_network_reconstructs_the_mix(tmp_path):
    """All bins through an identity network: STFT, cross-fade and inverse STFT must give the input back."""
    p = dict(n_fft=512, hop=128, dim_f=257, dim_t=32, segment_frames=32, zero_low_bins=0)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 257, "frames"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4, 257, "frames"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "identity.onnx"))
    store = ModelStore(tmp_path / "store")
    store.install("mdx_karaoke", [tmp_path / "identity.onnx"], params=p)
    audio = _mix(1.3)
    out = Engine(store).run_model("mdx_karaoke", audio, SR)
    assert np.max(np.abs(out["lead_vocals"] - audio)) < 1e-5
    assert np.max(np.abs(out["backing_vocals"])) < 1e-5


def test_params_that_do_not_fit_the_network_fail_at_setup(tmp_path):
    store = ModelStore(tmp_path)
    install_random_onnx(store, "mdx_karaoke", params=SMALL)  # a network for 192 bins ...
    manifest = store.manifest()
    manifest["models"]["mdx_karaoke"]["params"]["dim_f"] = 128  # ... declared as 128
    store._write_manifest(manifest)
    with pytest.raises(ChainError, match="does not match the params"):
        Engine(store).separator("mdx_karaoke")


def test_streams_a_batch_at_a_time_with_a_whole_runs_samples(tmp_path):
    """`stream` gives out each batch's final samples; the worker's streaming path equals a whole run."""

    from pipelines import signals as S

    store = ModelStore(tmp_path / "store")
    install_random_onnx(store, "mdx_karaoke", seed=2, params={**SMALL, "batch_size": 2})
    audio = _mix(4.0, seed=4)
    engine = Engine(store)
    sep = engine.separator("mdx_karaoke")
    whole = sep.separate(audio, SR)
    blocks = list(sep.stream(S.ArraySignal(audio), SR, 4096, lambda: False))
    assert len(blocks) > 20  # 4 s in batches of two 32-frame segments: never the whole track at once
    assert max(b["lead_vocals"].shape[1] for b in blocks) < audio.shape[1] // 10
    out = engine.stream_model("mdx_karaoke", S.ArraySignal(audio), SR, tmp_path / "work")
    for source in whole:
        streamed = np.concatenate([b[source] for b in blocks], axis=1)
        assert np.array_equal(streamed, whole[source])
        assert np.array_equal(out[source].to_array(), whole[source])
