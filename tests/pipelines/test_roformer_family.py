"""The roformer family against MSST's inference as tools/reference.py writes it, on small random models saved as MSST saves them."""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bs_roformer")

from pipelines import signals as S  # noqa: E402
from pipelines.engine import Engine  # noqa: E402
from pipelines.errors import Cancelled, ChainError  # noqa: E402
from pipelines.families.roformer import (  # noqa: E402
    Grid,
    RoformerParams,
    RoformerSeparator,
    build_model,
    split_model_config,
    to_package_layout,
)
from pipelines.modelstore import ModelStore  # noqa: E402
from pipelines.registry import get_spec, load_registry  # noqa: E402
from tools.reference import roformer_reference  # noqa: E402
from tools.roformer_models import install_random_roformer, make_random_roformer, roformer_config  # noqa: E402

SR = 44100
TOL = 1e-4
ROFORMER_IDS = sorted(m for m, spec in load_registry().items() if spec.family == "roformer")


@pytest.fixture(scope="module")
def mix() -> np.ndarray:
    """1.5 s of stereo noise: with 32768-sample chunks at overlap 2, 7 chunks in 4 batches, reflect-padded edges."""
    return (0.1 * np.random.default_rng(0).standard_normal((2, 66150))).astype(np.float32)


def _store(tmp_path, model_id: str, seed: int = 0, params: dict | None = None, **sections) -> ModelStore:
    config = roformer_config(model_id)
    for section, values in sections.items():
        config[section].update(values)
    store = ModelStore(tmp_path / f"store-{model_id}-{seed}")
    install_random_roformer(store, model_id, seed=seed, config=config, params=params)
    return store


def max_difference(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    assert sorted(ours) == sorted(theirs)
    return max(float(np.abs(ours[s] - theirs[s]).max()) for s in ours)


@pytest.mark.parametrize("model_id", ROFORMER_IDS)
def test_registry_params_are_valid(model_id):
    spec = get_spec(model_id)
    params = RoformerParams.model_validate(spec.params)
    assert spec.files == (params.config, params.checkpoint) and spec.channels == 2 and spec.sample_rate == SR
    assert spec.requires_package == "bs_roformer" and spec.queue == "gpu-roformer"
    assert params.residual is None or params.residual in spec.sources


@pytest.mark.parametrize("model_id", ROFORMER_IDS)
def test_engine_matches_the_reference(model_id, mix, tmp_path):
    store = _store(tmp_path, model_id, seed=len(model_id))
    ours = Engine(store).run_model(model_id, mix, SR)
    assert list(ours) == list(get_spec(model_id).sources)
    for y in ours.values():
        assert y.shape == mix.shape and y.dtype == np.float32 and np.isfinite(y).all()
    assert max_difference(ours, roformer_reference(store, model_id, mix)) <= TOL


@pytest.mark.parametrize(
    "model_id, sections",
    [
        ("bs_roformer_4stem", {"model": {"mlp_expansion_factor": 2, "sage_attention": True}}),  # as its released config
        (
            "mel_band_roformer_kj",
            {"inference": {"batch_size": 1, "num_overlap": 4}},
        ),  # the first chunk keeps no fade-in
        ("mel_band_roformer_kj", {"inference": {"batch_size": 3, "num_overlap": 3, "normalize": True}}),
        ("bs_roformer_viperx_1297", {"model": {"zero_dc": False}, "inference": {"batch_size": 4, "num_overlap": 2}}),
    ],
)
def test_config_variants_match_the_reference(model_id, sections, mix, tmp_path):
    store = _store(tmp_path, model_id, **sections)
    ours = Engine(store).run_model(model_id, mix, SR)
    assert max_difference(ours, roformer_reference(store, model_id, mix)) <= TOL


@pytest.mark.parametrize("frames", [1, 100, 9000, 20000, 32768, 40000])  # shorter than a chunk, two borders, ...
def test_short_signals_match_the_reference(frames, tmp_path):
    store = _store(tmp_path, "bs_roformer_viperx_1297")
    audio = (0.1 * np.random.default_rng(frames).standard_normal((2, frames))).astype(np.float32)
    ours = Engine(store).run_model("bs_roformer_viperx_1297", audio, SR)
    assert max_difference(ours, roformer_reference(store, "bs_roformer_viperx_1297", audio)) <= TOL


def test_params_override_the_config(mix, tmp_path):
    overrides = {"chunk_size": 4096, "num_overlap": 4, "batch_size": 3}
    store = _store(tmp_path, "mel_band_roformer_kj", params=overrides)
    sep = Engine(store).separator("mel_band_roformer_kj")
    assert (sep.chunk, sep.num_overlap, sep.group, sep.batch) == (4096, 4, 3, 3)
    ours = Engine(store).run_model("mel_band_roformer_kj", mix, SR)
    assert max_difference(ours, roformer_reference(store, "mel_band_roformer_kj", mix)) <= TOL
    plain = roformer_reference(
        store,
        "mel_band_roformer_kj",
        mix,  # the config's own grid
        overrides={"chunk_size": None, "num_overlap": None, "batch_size": None},
    )
    assert max_difference(ours, plain) > 10 * TOL  # the override changed the grid


@pytest.mark.parametrize("batch", [1, 5])
def test_streaming_equals_the_whole_signal_for_any_block_and_batch(batch, mix, tmp_path):
    """Blocks of 0.3 s (not a multiple of the 16384-sample step), written to scratch files as a worker does."""
    store = _store(tmp_path, "bs_roformer_4stem", params={"batch": batch})
    whole = Engine(store).separator("bs_roformer_4stem").separate(mix, SR)
    streamed = Engine(store, chunk_seconds=0.3).stream_model(
        "bs_roformer_4stem", S.ArraySignal(mix), SR, tmp_path / "w"
    )
    for name, signal in streamed.items():
        assert isinstance(signal, S.FrameFile)
        assert np.abs(signal.to_array() - whole[name]).max() <= 1e-5  # batching reorders float sums, nothing else


def test_silent_chunks_are_not_run_and_still_match(tmp_path):
    store = _store(tmp_path, "bs_roformer_viperx_1297")
    audio = np.zeros((2, 60000), np.float32)
    audio[:, 20000:25000] = 0.1 * np.random.default_rng(1).standard_normal((2, 5000))
    engine = Engine(store)
    sep = engine.separator("bs_roformer_viperx_1297")
    calls = []
    sep.model.register_forward_hook(lambda module, inputs, out: calls.append(inputs[0].shape[0]))
    ours = engine.run_model("bs_roformer_viperx_1297", audio, SR)
    grid = Grid(audio.shape[1], sep.chunk, sep.num_overlap, sep.group)
    assert sum(calls) < grid.count  # chunks of digital silence were skipped
    assert max_difference(ours, roformer_reference(store, "bs_roformer_viperx_1297", audio)) <= TOL


def test_residual_is_the_mix_minus_the_target(mix, tmp_path):
    store = _store(tmp_path, "mel_band_roformer_dereverb", inference={"normalize": True})
    out = Engine(store).run_model("mel_band_roformer_dereverb", mix, SR)
    assert np.abs(out["dry"] + out["reverb"] - mix).max() <= 1e-6


def test_grid_windows_follow_msst_batches():
    grid = Grid(frames=100_000, chunk=10_000, num_overlap=2, group=4)  # border 5000, 22 chunks
    assert (grid.border, grid.count, grid.fade) == (5000, 22, 1000)
    fade_in = lambda k: float(grid.window(k)[0])  # noqa: E731
    fade_out = lambda k: float(grid.window(k)[-1])  # noqa: E731
    assert fade_in(0) == 0.0 and fade_out(0) == 0.0  # chunk 0 shares its batch with 1-3: the window keeps its fades
    assert [fade_out(k) for k in (19, 20, 21)] == [0.0, 1.0, 1.0]  # the last batch (20, 21) has no fade-out
    single = Grid(frames=100_000, chunk=10_000, num_overlap=2, group=1)
    assert float(single.window(0)[0]) == 1.0 and float(single.window(1)[0]) == 0.0
    short = Grid(frames=9_000, chunk=10_000, num_overlap=2, group=4)  # not longer than two borders: no padding
    assert (short.border, short.count, short.length(1)) == (0, 2, 4000)


def test_published_layout_variants_map_to_the_package(mix, tmp_path):
    """A checkpoint in bs-roformer 0.4's layout (an empty linear slot first), wrapped as some are, gives the same output."""
    made = make_random_roformer("bs_roformer_viperx_1297", tmp_path / "made", seed=3)
    state = torch.load(made[1], weights_only=True)
    legacy = {
        re.sub(r"^layers\.(\d+)\.(\d)\.", lambda m: f"layers.{m[1]}.{int(m[2]) + 1}.", k): v for k, v in state.items()
    }
    assert any(k.startswith("layers.0.2.") for k in legacy)
    mapped, layout = to_package_layout({"state_dict": legacy})
    assert layout == "lucidrains-0.4" and set(mapped) == set(state)
    assert all(torch.equal(mapped[k], state[k]) for k in state)
    assert to_package_layout(state)[1] == "msst"

    reference_store = ModelStore(tmp_path / "a")
    reference_store.install("bs_roformer_viperx_1297", made)
    torch.save({"state_dict": legacy}, made[1])
    store = ModelStore(tmp_path / "b")
    store.install("bs_roformer_viperx_1297", made)
    sep = Engine(store).separator("bs_roformer_viperx_1297")
    assert sep.layout == "lucidrains-0.4"
    assert (
        max_difference(
            Engine(store).run_model("bs_roformer_viperx_1297", mix, SR),
            roformer_reference(reference_store, "bs_roformer_viperx_1297", mix),
        )
        <= TOL
    )


@pytest.mark.parametrize(
    "key, value, accepted",
    [
        ("sage_attention", True, True),
        ("use_torch_checkpoint", True, True),
        ("linear_transformer_depth", 0, True),
        ("skip_connection", False, True),
        ("use_pope", False, True),
        ("linear_transformer_depth", 1, False),
        ("skip_connection", True, False),
        ("use_pope", True, False),
        ("hyper_connections", 4, False),
    ],
)
def test_config_keys_the_package_lacks_are_handled_by_name(key, value, accepted):
    model = {**roformer_config("bs_roformer_viperx_1297")["model"], key: value}
    if accepted:
        kwargs, zero_dc, factor = split_model_config("bs_roformer", model)
        assert key not in kwargs and zero_dc is True and factor == 4
    else:
        with pytest.raises(ChainError, match=key):
            split_model_config("bs_roformer", model)


def test_mlp_expansion_factor_and_zero_dc_reach_the_model():
    model = {**roformer_config("bs_roformer_4stem")["model"], "mlp_expansion_factor": 2, "zero_dc": False}
    net = build_model("bs_roformer", model)
    first = net.mask_estimators[0].to_freqs[0][0][0]  # MLP's first Linear: dim -> dim * factor
    assert first.out_features == 2 * model["dim"]
    assert not net.mask_estimators[0]._forward_hooks  # zero_dc off: no DC hook
    assert build_model("bs_roformer", {**model, "zero_dc": True}).mask_estimators[0]._forward_hooks


@pytest.mark.parametrize(
    "change, message",
    [
        ({"params": {"sources": {"vocals": "singing"}}}, "registry declares"),
        ({"model": {"num_stems": 2}}, "num_stems"),
        ({"audio": {"sample_rate": 48000}}, "48000 Hz"),
        ({"audio": {"chunk_size": 8000}}, "multiple of stft_hop_length"),
        ({"params": {"chunk": 3}}, "chunk"),
        ({"params": {"precision": "float16"}}, "CUDA"),
    ],
)
def test_wrong_configs_are_refused_at_load(change, message, tmp_path):
    sections = {k: v for k, v in change.items() if k != "params"}
    with pytest.raises(ChainError, match=message):
        # a param the family does not know is refused at install already; the rest when the model loads
        store = _store(tmp_path, "bs_roformer_viperx_1297", params=change.get("params"), **sections)
        Engine(store).separator("bs_roformer_viperx_1297")


def test_auto_batch_and_precision(tmp_path):
    store = _store(tmp_path, "bs_roformer_viperx_1297", inference={"batch_size": 3})
    sep = Engine(store, device="auto").separator("bs_roformer_viperx_1297")  # no GPU here: auto is the CPU
    assert (sep.device, sep.batch, sep.group, sep.precision) == ("cpu", 3, 3, "float32")
    assert isinstance(sep, RoformerSeparator) and sep.layout == "msst" and not sep.model.training


def _relative_error(mixed: dict[str, np.ndarray], exact: dict[str, np.ndarray], name: str) -> float:
    return float(np.sqrt(np.mean((mixed[name] - exact[name]) ** 2)) / np.sqrt(np.mean(exact[name] ** 2)))


def test_bfloat16_autocast_stays_close_to_float32(mix, tmp_path):
    """Mixed precision on the CPU: the target within 40 dB of float32 (46 dB measured, docs/models.md)."""
    store = _store(tmp_path, "bs_roformer_viperx_1297", params={"precision": "bfloat16"})
    mixed = Engine(store).run_model("bs_roformer_viperx_1297", mix, SR)
    exact = roformer_reference(store, "bs_roformer_viperx_1297", mix)
    assert _relative_error(mixed, exact, "vocals") < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_auto_is_batched_float16_close_to_float32(mix, tmp_path):
    store = _store(tmp_path, "mel_band_roformer_kj", inference={"batch_size": 4})
    engine = Engine(store, device="cuda")
    sep = engine.separator("mel_band_roformer_kj")
    assert (sep.precision, sep.batch) == ("float16", 4)  # MSST's demix on a GPU: autocast float16 (use_amp)
    mixed = engine.run_model("mel_band_roformer_kj", mix, SR)
    assert _relative_error(mixed, roformer_reference(store, "mel_band_roformer_kj", mix), "vocals") < 0.01


class _OverflowsWhenMixed(torch.nn.Module):
    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            return torch.full((x.shape[0], 1, *x.shape[1:]), float("inf"))
        return 2 * x[:, None]


def test_mixed_precision_overflow_runs_again_in_float32(tmp_path):
    store = _store(tmp_path, "bs_roformer_viperx_1297", params={"precision": "bfloat16"})
    sep = Engine(store).separator("bs_roformer_viperx_1297")
    sep.model = _OverflowsWhenMixed()
    x = torch.ones(2, 2, 8)
    out = sep.forward(x)
    assert torch.equal(out, 2 * x[:, None]) and out.dtype == torch.float32 and sep.fallbacks == 1


def test_cancel_stops_between_chunks(mix, tmp_path):
    store = _store(tmp_path, "bs_roformer_viperx_1297")
    with pytest.raises(Cancelled):
        Engine(store).run_model("bs_roformer_viperx_1297", mix, SR, cancelled=lambda: True)
