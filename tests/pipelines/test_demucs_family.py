"""The demucs family against demucs itself, on small random models saved in Demucs's checkpoint format."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("demucs")

from demucs.api import Separator as DemucsCli  # noqa: E402

from pipelines.engine import Engine  # noqa: E402
from pipelines.errors import ChainError, ChecksumMismatch, ModelNotInstalled  # noqa: E402
from pipelines.families.demucs_family import DemucsSeparator  # noqa: E402
from pipelines.modelstore import ModelStore  # noqa: E402
from pipelines.presets import load_catalogue  # noqa: E402
from pipelines.registry import get_spec, load_registry  # noqa: E402
from tools.random_models import install_random_demucs, make_random_demucs  # noqa: E402
from tools.reference import demucs_reference  # noqa: E402

SR = 44100
DEMUCS_IDS = sorted(m for m, spec in load_registry().items() if spec.family == "demucs")
TOLERANCE = 1e-4  # max abs difference from demucs's own path; batching and threads reorder float sums


@pytest.fixture(scope="module")
def mix() -> np.ndarray:
    """3 s of stereo noise: with the small models' 2 s segments, apply_model overlaps two segments."""
    return (0.1 * np.random.default_rng(0).standard_normal((2, 3 * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    for model_id in DEMUCS_IDS:
        install_random_demucs(store, model_id, seed=len(model_id))
    return store


@pytest.fixture(scope="module")
def engine(store) -> Engine:
    return Engine(store)


def max_difference(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> float:
    assert sorted(ours) == sorted(theirs)
    return max(float(np.abs(ours[s] - theirs[s]).max()) for s in ours)


@pytest.mark.parametrize("model_id", DEMUCS_IDS)
def test_engine_matches_demucs(model_id, store, engine, mix, tmp_path):
    ours = engine.run_model(model_id, mix, SR)
    assert list(ours) == list(get_spec(model_id).sources)
    for y in ours.values():
        assert y.shape == mix.shape and y.dtype == np.float32 and np.isfinite(y).all()
    assert max_difference(ours, demucs_reference(store, model_id, mix, tmp_path)) <= TOLERANCE


def test_reference_is_what_the_demucs_cli_computes(store, mix, tmp_path):
    ours = demucs_reference(store, "htdemucs", mix, tmp_path / "a")
    cli = DemucsCli(
        model="955717e8",
        repo=tmp_path / "a" / "reference_repo",
        device="cpu",
        shifts=0,
        overlap=0.25,
        split=True,
        segment=None,
        jobs=0,
        progress=False,
    )
    with torch.inference_mode():
        _, theirs = cli.separate_tensor(torch.from_numpy(mix))
    assert max_difference(ours, {k: v.numpy() for k, v in theirs.items()}) <= TOLERANCE


@pytest.mark.parametrize("model_id", ["htdemucs", "hdemucs_mmi"])
def test_batched_segments_match_demucs(model_id, mix, tmp_path):
    store = ModelStore(tmp_path / "store")
    # 1.2 s segments: three of them, the last shorter (hdemucs pads it to another length)
    install_random_demucs(store, model_id, params={"batch": 2, "segment": 1.2})
    ours = Engine(store).run_model(model_id, mix, SR)
    assert max_difference(ours, demucs_reference(store, model_id, mix, tmp_path, segment=1.2)) <= TOLERANCE


def test_corrupt_weight_file_raises_checksum_mismatch(mix, tmp_path):
    store = ModelStore(tmp_path / "store")
    (path,) = install_random_demucs(store, "htdemucs")
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumMismatch) as caught:
        Engine(store).run_model("htdemucs", mix, SR)
    assert caught.value.fields["file"] == str(path)
    assert path.name in str(caught.value)


def test_missing_weight_file_raises_model_not_installed(mix, tmp_path):
    store = ModelStore(tmp_path / "store")
    paths = install_random_demucs(store, "htdemucs_ft", share_derived=False)  # it cannot load: nothing to derive
    missing = paths[2]
    missing.unlink()
    with pytest.raises(ModelNotInstalled) as caught:
        Engine(store).run_model("htdemucs_ft", mix, SR)
    assert caught.value.fields["file"] == str(missing)
    assert missing.name in str(caught.value)


def test_checkpoint_with_other_sources_is_refused_at_load(tmp_path):
    six_sources = make_random_demucs("htdemucs_6s", tmp_path / "made")
    store = ModelStore(tmp_path / "store")
    store.install("htdemucs", six_sources)  # one file: the store renames it to htdemucs's
    with pytest.raises(ChainError, match="guitar"):
        Engine(store).separator("htdemucs")


def test_bad_params_are_refused_at_install_or_load(tmp_path):
    """A param the family does not know is refused at install; one that only the checkpoint can judge (a segment
    longer than the model was trained on), and one written into the manifest by hand, when the model loads."""
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ChainError, match="chunk"):
        install_random_demucs(store, "htdemucs", params={"chunk": 3})
    assert store.entry("htdemucs") is None
    install_random_demucs(store, "htdemucs", params={"segment": 30.0})
    with pytest.raises(ChainError, match="longer than"):
        Engine(store).separator("htdemucs")
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest["models"]["htdemucs"]["params"] = {"chunk": 3}
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ChainError, match="chunk"):
        Engine(ModelStore(store.root)).separator("htdemucs")


def test_separator_holds_one_loaded_model(engine):
    sep = engine.separator("htdemucs")
    assert isinstance(sep, DemucsSeparator)
    assert engine.separator("htdemucs") is sep and not sep.model.training


def test_4_tracks_falls_back_to_htdemucs(mix, tmp_path):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs")
    engine = Engine(store)
    result = engine.run("4_tracks", mix, SR)
    chains = load_catalogue().preset("4_tracks").chains
    assert chains[result.chain_index].model_ids == ("htdemucs",)
    assert list(result.stems) == ["vocals", "drums", "bass", "other"]
    assert result.made_by == {stem: "htdemucs" for stem in result.stems}
    direct = engine.run_model("htdemucs", mix, SR)  # the preset maps the model's sources one to one
    for stem, y in result.stems.items():
        assert y.shape == mix.shape and y.dtype == np.float32 and np.isfinite(y).all()
        np.testing.assert_array_equal(y, direct[stem])
    # Random weights: the stems need not sum to the mix (a trained htdemucs gets close), so no such check.


def test_auto_batch_and_precision_resolve_per_device(tmp_path):
    """`auto` keeps the CLI's exact path on a CPU and batches in mixed precision on a GPU."""
    from pipelines.families.params import (
        DEMUCS_GPU_BATCH as GPU_BATCH,
        DEMUCS_GPU_PRECISION as GPU_PRECISION,
        DemucsParams,
    )

    auto = DemucsParams(name="x")
    assert auto.resolved("cpu") == (1, "float32")
    assert auto.resolved("cuda") == auto.resolved("cuda:1") == (GPU_BATCH, GPU_PRECISION)
    assert DemucsParams(name="x", batch=3, precision="bfloat16").resolved("cuda") == (3, "bfloat16")
    with pytest.raises(ValueError):
        DemucsParams(name="x", batch=0)
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs")
    sep = Engine(store, device="auto").separator("htdemucs")  # no GPU here: auto is the CPU
    assert (sep.device, sep.batch, sep.precision) == ("cpu", 1, "float32")


class _OverflowsWhenMixed(torch.nn.Module):
    """A forward that overflows under autocast, as a float16 activation can: +inf where float32 is finite."""

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            return torch.full_like(x, float("inf"))
        return 2 * x


def test_mixed_precision_overflow_runs_again_in_float32(tmp_path):
    store = ModelStore(tmp_path / "store")
    install_random_demucs(store, "htdemucs", params={"precision": "bfloat16"})
    sep = Engine(store).separator("htdemucs")
    x = torch.ones(1, 2, 8)
    out = sep._forward(_OverflowsWhenMixed(), x)
    assert torch.equal(out, 2 * x) and out.dtype == torch.float32
    assert sep.fallbacks == 1
    assert torch.equal(sep._forward(torch.nn.Identity(), x), x) and sep.fallbacks == 1  # finite: no second run
