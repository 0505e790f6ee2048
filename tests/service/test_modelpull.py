"""`stems models pull` over real HTTP (a loopback server that honours Range and can drop a connection) and S3 (moto).

The servers stand in for the publishers and for mirrors: they serve stand-in weight files
at the paths of the registry's publisher URLs, so the real registry entries, the real
checks and the real store are used. The UVR ONNX models publish no checksum, so a random
stand-in under the released name installs; demucs checkpoints carry their sha256 prefix in
their name and the SAM/gtcrn entries pin a sha256, so stand-ins under those names must be
refused. The one registry entry a test adds (a demucs checkpoint whose name carries the
stand-in's own sha256 prefix) is there because no random file can match a released name.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import numpy as np
import pytest

from pipelines.engine import Engine
from pipelines.modelstore import ModelStore, sha256_file
from pipelines.registry import Download, get_spec, load_registry
from stems.redisboot import free_port
from tests.webserver import WebServer
from tools.onnx_models import make_random_mdx_onnx

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def web():
    w = WebServer()
    yield w
    w.close()


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "STEMS_MODEL_MIRROR"}
    return subprocess.run(
        [sys.executable, "-m", "stems.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **env},
    )


def path_of(model_id: str, index: int = 0) -> str:
    """The URL path the registry's publisher URL has, which is where a mirror keeps the file."""
    return urlsplit(get_spec(model_id).downloads[index].url).path


def onnx_standin(tmp_path: Path, model_id: str, seed: int = 0) -> bytes:
    spec = get_spec(model_id)
    p = spec.params
    path = make_random_mdx_onnx(
        tmp_path / f"standin-{model_id}-{seed}.onnx", p["n_fft"], p["dim_f"], p["segment_frames"], seed=seed
    )
    return path.read_bytes()


def manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())["models"]


def test_pull_downloads_checks_installs_and_the_engine_loads_it(tmp_path, web):
    body = onnx_standin(tmp_path, "mdx_karaoke")
    web.files["/mirror" + path_of("mdx_karaoke")] = body
    store = tmp_path / "store"
    r = cli("models", "pull", "mdx_karaoke", "--model-dir", str(store), STEMS_MODEL_MIRROR=web.url("/mirror"))
    assert r.returncode == 0, r.stderr
    assert "mdx_karaoke: installed" in r.stdout
    assert manifest(store)["mdx_karaoke"]["files"] == {"UVR_MDXNET_KARA_2.onnx": hashlib.sha256(body).hexdigest()}
    assert sorted(p.name for p in store.iterdir()) == ["UVR_MDXNET_KARA_2.onnx", "manifest.json"]  # no .part left
    assert [h.path for h in web.hits] == [
        "/mirror/TRvlvr/model_repo/releases/download/all_public_uvr_models/UVR_MDXNET_KARA_2.onnx"
    ]
    v = cli("models", "verify", "--model-dir", str(store))
    assert v.returncode == 0 and "mdx_karaoke" in v.stdout and "ok" in v.stdout

    audio = np.random.default_rng(0).standard_normal((2, 44100)).astype(np.float32) * 0.1
    out = Engine(ModelStore(store)).run_model("mdx_karaoke", audio, 44100)
    assert set(out) == {"lead_vocals", "backing_vocals"} and all(
        np.isfinite(y).all() and y.shape == audio.shape for y in out.values()
    )

    again = cli("models", "pull", "mdx_karaoke", "--model-dir", str(store), STEMS_MODEL_MIRROR=web.url("/mirror"))
    assert again.returncode == 0 and "already installed and verified" in again.stdout
    assert len(web.hits) == 1  # nothing downloaded the second time


def test_a_checksum_mismatch_is_refused_and_installs_nothing(tmp_path, web):
    from tools.random_models import make_random_demucs

    standin = make_random_demucs("htdemucs", tmp_path / "standin")[0].read_bytes()  # released name, other bytes
    web.files[path_of("htdemucs")] = standin
    web.files[path_of("gtcrn")] = b"not the published gtcrn.onnx"
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"version": 1, "models": {}}))
    before = (store / "manifest.json").read_bytes()
    for model_id, published in (("htdemucs", "8726e21a"), ("gtcrn", get_spec("gtcrn").downloads[0].sha256)):
        r = cli("models", "pull", model_id, "--model-dir", str(store), STEMS_MODEL_MIRROR=web.url(""))
        assert r.returncode == 1, r.stdout
        assert "refused, nothing installed" in r.stderr and published in r.stderr and "Traceback" not in r.stderr
        assert (store / "manifest.json").read_bytes() == before
        assert sorted(p.name for p in store.iterdir()) == ["manifest.json"]  # neither the file nor its .part


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path, web):
    body = onnx_standin(tmp_path, "mdx_dereverb")
    path = path_of("mdx_dereverb")
    web.files[path] = body
    web.cuts[path] = [1000]  # the first response drops the connection after 1000 bytes
    store = tmp_path / "store"
    r = cli("models", "pull", "mdx_dereverb", "--model-dir", str(store), STEMS_MODEL_MIRROR=web.url(""))
    assert r.returncode == 0, r.stderr
    first, second = web.requests("GET", path)
    assert "range" not in first.headers and first.sent == 1000
    assert second.headers["range"] == "bytes=1000-" and second.sent == len(body) - 1000
    assert (store / "Reverb_HQ_By_FoxJoy.onnx").read_bytes() == body
    assert manifest(store)["mdx_dereverb"]["files"]["Reverb_HQ_By_FoxJoy.onnx"] == hashlib.sha256(body).hexdigest()


def test_a_pull_that_keeps_breaking_is_resumed_by_the_next_run(tmp_path, web):
    body = onnx_standin(tmp_path, "mdx_decrowd")
    path = path_of("mdx_decrowd")
    web.files[path] = body
    web.cuts[path] = [500, 500, 500]  # every attempt of the first run breaks
    store = tmp_path / "store"
    r = cli("models", "pull", "mdx_decrowd", "--model-dir", str(store), STEMS_MODEL_MIRROR=web.url(""))
    assert r.returncode == 1 and "run the same command again to resume" in r.stderr and "Traceback" not in r.stderr
    part = store / "UVR-MDX-NET_Crowd_HQ_1.onnx.part"
    assert part.read_bytes() == body[:1500] and "mdx_decrowd" not in manifest_or_empty(store)
    assert [h.headers.get("range") for h in web.requests("GET", path)] == [None, "bytes=500-", "bytes=1000-"]

    r = cli("models", "pull", "mdx_decrowd", "--model-dir", str(store), STEMS_MODEL_MIRROR=web.url(""))
    assert r.returncode == 0, r.stderr
    last = web.requests("GET", path)[-1]
    assert last.headers["range"] == "bytes=1500-" and last.sent == len(body) - 1500  # only the rest, not restarted
    assert (store / "UVR-MDX-NET_Crowd_HQ_1.onnx").read_bytes() == body and not part.exists()


def test_a_server_that_ignores_range_makes_the_download_restart(tmp_path, web):
    body = onnx_standin(tmp_path, "mdx_karaoke", seed=4)
    path = path_of("mdx_karaoke")
    web.files[path] = body
    web.cuts[path] = [700]
    web.ignore_range.add(path)
    store = tmp_path / "store"
    r = cli("models", "pull", "mdx_karaoke", "--model-dir", str(store), STEMS_MODEL_MIRROR=web.url(""))
    assert r.returncode == 0, r.stderr
    second = web.requests("GET", path)[1]
    assert second.headers["range"] == "bytes=700-" and second.sent == len(body)  # a 200: the whole file again
    assert (store / "UVR_MDXNET_KARA_2.onnx").read_bytes() == body


def test_a_complete_part_from_a_stopped_run_is_installed_without_fetching_it_again(tmp_path, web):
    body = onnx_standin(tmp_path, "mdx_karaoke", seed=5)
    web.files[path_of("mdx_karaoke")] = body
    store = tmp_path / "store"
    store.mkdir()
    (store / "UVR_MDXNET_KARA_2.onnx.part").write_bytes(body)  # a run stopped after the transfer, before installing
    r = cli("models", "pull", "mdx_karaoke", "--model-dir", str(store), STEMS_MODEL_MIRROR=web.url(""))
    assert r.returncode == 0, r.stderr
    (hit,) = web.requests("GET", path_of("mdx_karaoke"))
    assert hit.headers["range"] == f"bytes={len(body)}-" and hit.sent == 0  # answered 416: nothing left to send
    assert (store / "UVR_MDXNET_KARA_2.onnx").read_bytes() == body


def manifest_or_empty(store: Path) -> dict:
    return manifest(store) if (store / "manifest.json").exists() else {}


def test_an_s3_mirror_serves_the_publishers_paths(tmp_path, s3_url):
    bucket = f"m{uuid.uuid4().hex[:10]}"
    s3 = boto3.client(
        "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    s3.create_bucket(Bucket=bucket)
    body = onnx_standin(tmp_path, "mdx_dereverb", seed=2)
    s3.put_object(Bucket=bucket, Key="weights" + path_of("mdx_dereverb"), Body=body)
    store = tmp_path / "store"
    store.mkdir()
    # An earlier run broke after 1200 bytes. They are zeros here, so the result shows that only the rest was
    # fetched (a ranged GET): UVR publishes no checksum that would catch a .part spoilt like this.
    (store / "Reverb_HQ_By_FoxJoy.onnx.part").write_bytes(bytes(1200))
    env = {
        "STEMS_MODEL_MIRROR": f"s3://{bucket}/weights",
        "S3_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
    }
    r = cli("models", "pull", "mdx_dereverb", "--model-dir", str(store), **env)
    assert r.returncode == 0, r.stderr
    assert (store / "Reverb_HQ_By_FoxJoy.onnx").read_bytes() == bytes(1200) + body[1200:]
    assert manifest(store)["mdx_dereverb"]["files"]["Reverb_HQ_By_FoxJoy.onnx"] == sha256_file(
        store / "Reverb_HQ_By_FoxJoy.onnx"
    )
    assert cli("models", "verify", "--model-dir", str(store)).returncode == 0

    r = cli("models", "pull", "mdx_karaoke", "--model-dir", str(store), **env)  # not on the mirror
    assert r.returncode == 1 and f"s3://{bucket}/weights/TRvlvr/" in r.stderr and "Traceback" not in r.stderr


def test_offline_it_fails_in_seconds_naming_the_url_and_the_install_command(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = tmp_path / "store"
    t0 = time.monotonic()
    r = cli("models", "pull", "htdemucs_ft", "--model-dir", str(store), STEMS_MODEL_MIRROR=closed)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1 and elapsed < 15, (elapsed, r.stderr)
    assert f"{closed}/adefossez/demucs/" in r.stderr  # the first file of the model: its bag yaml
    assert "stems models install htdemucs_ft PATH/htdemucs_ft.yaml PATH/f7e0c4bc-ba3fe64a.th" in r.stderr
    assert "Traceback" not in r.stderr and not list(store.glob("*.part"))

    r = cli("models", "pull", "--all", "--model-dir", str(store), STEMS_MODEL_MIRROR=closed)
    assert r.returncode == 1
    lines = {line.split(":", 1)[0]: line for line in r.stderr.splitlines() if line}
    assert (
        "failed" in lines["htdemucs"]
        and f"{closed}/demucs/hybrid_transformer/955717e8-8726e21a.th" in lines["htdemucs"]
    )
    assert "gated" in lines["sam-audio-large"] and "gated" in lines["mdx_duet"]


def test_gated_weights_say_how_to_get_them(tmp_path, capsys):
    from stems.cli import main

    r = cli("models", "pull", "sam-audio-small", "--model-dir", str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "huggingface.co/facebook/sam-audio-small" in r.stderr and "SAM License" in r.stderr
    assert "stems models install sam-audio-small" in r.stderr

    store = ["--model-dir", str(tmp_path)]
    assert main(["models", "pull", "dsp.centre", *store]) == 0 and "nothing to pull" in capsys.readouterr().out
    assert main(["models", "pull", "no_such_model", *store]) == 2 and "unknown model id" in capsys.readouterr().err
    assert main(["models", "pull", *store]) == 2  # neither ids nor --all
    assert main(["models", "pull", "htdemucs", "--mirror", "ftp://mirror/x", *store]) == 2
    assert "STEMS_MODEL_MIRROR must be" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_published_sha256_and_md5_are_checked(tmp_path):
    from pipelines.errors import ChecksumMismatch
    from stems.modelpull import verify

    f = tmp_path / "w.onnx"
    f.write_bytes(b"weights")
    spec = get_spec("mdx_karaoke")
    good = Download(
        file=spec.files[0],
        url="https://x/w.onnx",
        sha256=hashlib.sha256(b"weights").hexdigest(),
        md5=hashlib.md5(b"weights").hexdigest(),
    )
    verify(spec, good, f, good.url)
    for bad in (
        good.model_copy(update={"md5": hashlib.md5(b"other").hexdigest()}),
        good.model_copy(update={"sha256": hashlib.sha256(b"other").hexdigest()}),
    ):
        with pytest.raises(ChecksumMismatch):
            verify(spec, bad, f, bad.url)


@pytest.fixture
def demucs_standin(tmp_path):
    """A random htdemucs checkpoint registered under a demucs-style name carrying its own sha256 prefix.

    No random file can hash to a released name's prefix, so this adds one registry entry (a copy of
    htdemucs with that file) for the test's duration; pull, verify, install and the engine run as for
    any entry.
    """
    from tools.random_models import make_random_demucs

    raw = make_random_demucs("htdemucs", tmp_path / "standin")[0].read_bytes()
    name = f"955717e8-{hashlib.sha256(raw).hexdigest()[:8]}.th"
    base = get_spec("htdemucs")
    spec = base.model_copy(
        update={
            "id": "htdemucs_standin",
            "files": (name,),
            "downloads": (Download(file=name, url=base.downloads[0].url.rsplit("/", 1)[0] + "/" + name),),
        }
    )
    registry = load_registry()
    registry[spec.id] = spec
    yield spec, raw
    del registry[spec.id]


def test_a_demucs_checkpoint_is_checked_by_the_prefix_in_its_name(tmp_path, web, demucs_standin, capsys):
    from stems.cli import main

    spec, raw = demucs_standin
    web.files[urlsplit(spec.downloads[0].url).path] = raw
    store = tmp_path / "store"
    assert main(["models", "pull", spec.id, "--model-dir", str(store), "--mirror", web.url("")]) == 0
    assert f"{spec.id}: installed" in capsys.readouterr().out
    assert manifest(store)[spec.id]["files"] == {spec.files[0]: hashlib.sha256(raw).hexdigest()}
    sep = Engine(ModelStore(store)).separator(spec.id)  # demucs's own loader reads the pulled checkpoint
    assert list(sep.model.sources) == ["drums", "bass", "other", "vocals"]

    web.files[urlsplit(spec.downloads[0].url).path] = raw[:-1] + bytes([raw[-1] ^ 1])  # one bit off
    (store / spec.files[0]).unlink()
    assert main(["models", "pull", spec.id, "--model-dir", str(store), "--mirror", web.url("")]) == 1
    assert "refused, nothing installed" in capsys.readouterr().err
    assert not (store / spec.files[0]).exists() and not list(store.glob("*.part"))
