"""Fixtures of the fault tests: a small randomly initialised htdemucs and an 8-second song, a split that
takes a few seconds on a CPU (long enough to be interrupted mid-way, short enough for CI)."""

from __future__ import annotations

import pytest

from pipelines.modelstore import ModelStore
from tests.support import LONG_S, SONG_S, tone_mix, write_audio

SR = 44100


@pytest.fixture(scope="module")
def demucs_models(tmp_path_factory):
    from tools.random_models import install_random_demucs

    store = ModelStore(tmp_path_factory.mktemp("models"))
    # torch, not ONNX Runtime: its slower forward keeps a split long enough for a fault to land mid-way
    install_random_demucs(store, "htdemucs", size="small", params={"backend": "torch"}, share_derived=False)
    return store.root


@pytest.fixture(scope="module")
def fault_song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("song") / "song.wav", tone_mix(SONG_S, SR), SR)


@pytest.fixture(scope="module")
def long_song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("long") / "long.wav", tone_mix(LONG_S, SR), SR)
