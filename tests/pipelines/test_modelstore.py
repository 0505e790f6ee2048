"""The model store and its CLI: install pins sha256, list/verify report, loading names what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.errors import ChecksumMismatch, ModelNotInstalled
from pipelines.modelstore import ModelStore, sha256_file
from pipelines.registry import get_spec

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stems.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_install_list_verify_through_the_cli(tmp_path):
    weights = tmp_path / "somewhere" / "gtcrn.onnx"
    weights.parent.mkdir()
    weights.write_bytes(b"not really onnx, but the store only pins bytes")
    store = tmp_path / "store"
    r = cli("models", "install", "gtcrn", str(weights), "--model-dir", str(store))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((store / "manifest.json").read_text())
    entry = manifest["models"]["gtcrn"]
    assert entry["files"] == {"gtcrn.onnx": sha256_file(weights)}
    assert (entry["family"], entry["sample_rate"], entry["channels"], entry["licence"]) == ("speech", 16000, 1, "MIT")

    listed = {m["id"]: m for m in json.loads(cli("models", "list", "--json", "--model-dir", str(store)).stdout)}
    assert listed["gtcrn"]["installed"] == "yes"
    assert listed["htdemucs"]["installed"] == "no" and "not installed" in listed["htdemucs"]["reason"]
    assert listed["dsp.centre"]["installed"] == "yes"

    assert cli("models", "verify", "--model-dir", str(store)).returncode == 0
    (store / "gtcrn.onnx").write_bytes(b"tampered")
    r = cli("models", "verify", "--model-dir", str(store))
    assert r.returncode == 1 and "gtcrn.onnx" in r.stdout and "sha256" in r.stdout


def test_install_refuses_missing_files_and_weightless_models(tmp_path):
    r = cli("models", "install", "dtln", str(tmp_path / "x.onnx"), "--model-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and "dtln_model_1.onnx" in r.stderr
    r = cli("models", "install", "dsp.centre", str(tmp_path), "--model-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and "needs no weight files" in r.stderr
    r = cli("models", "install", "no_such_model", str(tmp_path), "--model-dir", str(tmp_path / "s"))
    assert r.returncode != 0


def test_resolve_names_the_file_the_place_and_the_fix(tmp_path):
    store = ModelStore(tmp_path)
    spec = get_spec("htdemucs")
    with pytest.raises(ModelNotInstalled) as err:
        store.resolve(spec)
    msg = str(err.value)
    assert str(tmp_path) in msg and "stems models install htdemucs" in msg
    f = tmp_path / "w.th"
    f.write_bytes(b"123")
    store.install("htdemucs", [f])
    assert store.resolve(spec) == {spec.files[0]: tmp_path / spec.files[0]}
    (tmp_path / spec.files[0]).write_bytes(b"124")
    with pytest.raises(ChecksumMismatch) as err:
        store.resolve(spec)
    assert spec.files[0] in str(err.value) and err.value.fields["expected"] != err.value.fields["actual"]
    (tmp_path / spec.files[0]).unlink()
    with pytest.raises(ModelNotInstalled) as err:
        store.resolve(spec)
    assert spec.files[0] in str(err.value)


def test_presets_cli_lists_availability(tmp_path):
    r = cli("presets", "--model-dir", str(tmp_path))
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    # what serves a preset here, and plainly when it is signal processing rather than a trained model
    assert any(
        line.startswith("phantom_center") and "served by  dsp.centre" in line and "DSP fallback" in line
        for line in lines
    )
    assert any(line.startswith("6_tracks") and "missing" in line and "htdemucs_6s" in line for line in lines)
    hint = lines[[i for i, line in enumerate(lines) if line.startswith("6_tracks")][0] + 2]
    assert hint.split() == ["to", "install:", "stems", "models", "pull", "htdemucs_6s"]
    # weights with no public release: the command first; the explanation with --details
    strings = lines[[i for i, line in enumerate(lines) if line.startswith("modern_bowed_strings")][0] + 2]
    assert strings.split() == ["to", "install:", "stems", "models", "install", "mdx_strings", "PATH/mdx_strings.onnx"]
    details = cli("presets", "--model-dir", str(tmp_path), "--details").stdout
    assert "No public release of these weights is known" in details
