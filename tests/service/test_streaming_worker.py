"""The worker's streaming split in-process: chunked equals whole, shared steps run once, scratch is swept.

These run `workers.splitter.run_split` against the session's real Redis and a local storage
directory, with small randomly initialised Demucs models, so they exercise download,
block-wise decode, the engine's streaming path and step cache, block-wise WAV and HQ
writing and upload without Celery in between.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipelines import audio as A
from pipelines.cache import StepCache
from pipelines.engine import Engine
from pipelines.modelstore import ModelStore
from stems.jobstore import JobStore
from stems.models import AssetStatus, AudioAsset, Job, JobStatus
from stems.settings import Settings
from stems.storage import LocalStorage
from tests.support import write_audio

pytest.importorskip("demucs")
torch = pytest.importorskip("torch")

SR = 44100
TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> ModelStore:
    from tools.random_models import install_random_demucs

    store = ModelStore(tmp_path_factory.mktemp("models"))
    install_random_demucs(store, "htdemucs", seed=3)
    return store


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    audio = (0.1 * np.random.default_rng(7).standard_normal((2, int(9.5 * SR)))).astype(np.float32)
    return write_audio(tmp_path_factory.mktemp("song") / "song.wav", audio, SR, "FLOAT"), audio


def _context(tmp: Path, redis_url: str, models: ModelStore, chunk_seconds: float, cache: bool):
    from workers.context import WorkerContext

    settings = Settings(data_dir=tmp / "data", redis_url=redis_url, storage="local")
    engine = Engine(
        models, chunk_seconds=chunk_seconds, cache=StepCache(tmp / "data" / "cache", 1 << 30) if cache else None
    )
    return WorkerContext(
        settings=settings,
        store=JobStore.from_url(redis_url, f"t{uuid.uuid4().hex[:8]}"),
        storage=LocalStorage(tmp / "data" / "objects"),
        models=models,
        engine=engine,
        scratch_dir=tmp / "data" / "work",
    )


def _job(ctx, path: Path, preset: str, selection: dict | None = None, hq: str | None = "aac") -> Job:
    from pipelines.presets import load_catalogue

    asset = AudioAsset(user_id="u", origin="upload", status=AssetStatus.complete, object_key=f"src/{uuid.uuid4().hex}")
    ctx.storage.put_file(asset.object_key, path)
    ctx.store.put_asset(asset)
    from pipelines.jobspec import SplitSpec

    index, chain = load_catalogue().preset(preset).pick_chain(ctx.models.missing)
    spec = SplitSpec(preset=preset, chain_index=index, selection=selection, bit_depth=32, hq_format=hq)
    job = Job(
        user_id="u",
        audio_id=asset.id,
        source_kind="audio",
        source_id=asset.id,
        spec=spec,
        queue=chain.queue,
    )
    stems, _ = job.make_stems(load_catalogue().preset(preset).output_stems())
    ctx.store.create_job(job, stems)
    return job


def _wavs(ctx, job: Job) -> dict[str, np.ndarray]:
    out = {}
    for stem in ctx.store.get_stems(job.stem_ids):
        data = b"".join(ctx.storage.iter_range(stem.wav_key))
        out[stem.name] = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)[0].T
    return out


def _split(ctx, job: Job) -> Job:
    """The job's run as a worker does it, in this process: a GPU-queue job's separation, then its delivery stage."""
    from workers.delivery import run_delivery
    from workers.splitter import run_split

    run_split(job.id, ctx)
    if ctx.store.get_job(job.id).separated is not None:
        run_delivery(job.id, ctx)
    done = ctx.store.get_job(job.id)
    assert done.status == JobStatus.complete, done
    return done


def test_chunked_worker_equals_whole_track_reference(tmp_path, redis_url, models, song):
    """Decode, separate and write in 1.3 s blocks: the stems equal demucs on the whole selection."""
    from tools.reference import demucs_reference

    path, audio = song
    ctx = _context(tmp_path, redis_url, models, chunk_seconds=1.3, cache=False)
    job = _job(ctx, path, "4_tracks", selection={"start": 0.5, "end": 9.0})
    _split(ctx, job)
    whole = audio[:, int(0.5 * SR) : int(9.0 * SR)]
    expected = demucs_reference(models, "htdemucs", whole, tmp_path / "ref")
    got = _wavs(ctx, job)
    assert set(got) == {"vocals", "drums", "bass", "other"}
    for name, y in got.items():
        assert y.shape == whole.shape
        assert np.max(np.abs(y - expected[name])) <= TOL, name
    for stem in ctx.store.get_stems(job.stem_ids):  # HQ encodes were written block by block too
        assert stem.hq_key and stem.hq_size > 0
        with open(tmp_path / "hq.m4a", "wb") as f:
            f.write(b"".join(ctx.storage.iter_range(stem.hq_key)))
        decoded, sr = A.decode(tmp_path / "hq.m4a")
        assert sr == SR and abs(decoded.shape[1] - whole.shape[1]) < 3000  # the codec's priming and padding
    assert list((tmp_path / "data" / "work").iterdir()) == []  # scratch removed


def test_chunk_size_does_not_change_the_stems(tmp_path, redis_url, models, song):
    path, _ = song
    results = []
    for chunk in (100.0, 0.9):
        ctx = _context(tmp_path / f"c{chunk}", redis_url, models, chunk_seconds=chunk, cache=False)
        results.append(_wavs(ctx, _split(ctx, _job(ctx, path, "2_tracks", hq=None))))
    for name in results[0]:
        assert np.max(np.abs(results[0][name] - results[1][name])) <= 1e-6


def test_presets_sharing_a_step_run_the_model_once(tmp_path, redis_url, models, song):
    """2_tracks, acapella, instrumental and 4_tracks on one audio: htdemucs runs once, the rest are cache hits."""
    path, _ = song
    ctx = _context(tmp_path, redis_url, models, chunk_seconds=30.0, cache=True)
    sep = ctx.engine.separator("htdemucs")
    calls = []
    original = sep.stream

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    sep.stream = counting
    stems = {}
    for preset in ("2_tracks", "acapella", "instrumental", "4_tracks"):
        stems[preset] = _wavs(ctx, _split(ctx, _job(ctx, path, preset, hq=None)))
    assert len(calls) == 1
    assert ctx.engine.cache.hits == 3
    # encoded stems another job made are reused: acapella's and 4_tracks' vocals, instrumental's instrumental
    assert (ctx.engine.cache.file_hits, ctx.engine.cache.file_misses) == (3, 5)
    four = stems["4_tracks"]
    np.testing.assert_array_equal(stems["acapella"]["vocals"], four["vocals"])
    np.testing.assert_array_equal(stems["2_tracks"]["vocals"], four["vocals"])
    instrumental = np.sum([four[s] for s in ("drums", "bass", "other")], axis=0)
    assert np.max(np.abs(stems["instrumental"]["instrumental"] - instrumental)) <= 1e-6
    # another selection is other samples: a miss; the same selection again: a hit
    _split(ctx, _job(ctx, path, "4_tracks", selection={"start": 1.0, "end": 5.0}, hq=None))
    assert len(calls) == 2
    _split(ctx, _job(ctx, path, "4_tracks", selection={"start": 1.0, "end": 5.0}, hq=None))
    assert len(calls) == 2


def test_scratch_left_by_a_dead_worker_is_swept(tmp_path, redis_url, models, song):
    from workers.splitter import _HOST

    path, _ = song
    ctx = _context(tmp_path, redis_url, models, chunk_seconds=30.0, cache=False)
    work = tmp_path / "data" / "work"
    work.mkdir(parents=True)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    left = work / f"split-{_HOST}-{dead}-abc"
    left.mkdir()
    (left / "mix.npy").write_bytes(b"x" * 100)
    mine = work / f"split-{_HOST}-{os.getpid()}-keep"  # this process's: never swept by itself
    mine.mkdir()
    t0 = time.time()
    _split(ctx, _job(ctx, path, "4_tracks", selection={"start": 0.0, "end": 2.0}, hq=None))
    assert not left.exists() and mine.exists()
    assert time.time() - t0 < 120
