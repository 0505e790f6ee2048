"""The model store: one door from a model id to weight files pinned by sha256.

A store is a directory holding weight files and `manifest.json`:

    {"version": 1, "models": {"htdemucs": {"family": "demucs", "files": {"htdemucs.th": "<sha256>"},
      "sample_rate": 44100, "channels": 2, "sources": [...], "licence": "MIT", "params": {}}}}

An S3 prefix is synced into a local directory first (see `stems.modelsync`), so this
module only ever reads local files. Every error names the file, where it was looked for
and the command that installs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ChecksumMismatch, ModelNotInstalled
from .install_hint import pullable
from .registry import ModelSpec, get_spec, load_registry

MANIFEST = "manifest.json"


def sha256_file(path: Path, _cache: dict[tuple[str, int, int], str] = {}) -> str:  # noqa: B006 - per-process memo on purpose
    """sha256 of a file, memoised on (path, size, mtime) so warm jobs do not re-hash weights."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- reading -----------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.exists():
            return {"version": 1, "models": {}}
        manifest: dict[str, Any] = json.loads(path.read_text())
        return manifest

    def entry(self, model_id: str) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = self.manifest()["models"].get(model_id)
        return entry

    def install_command(self, spec: ModelSpec) -> str:
        """The `stems models install` command that installs `spec`'s files by hand (no network)."""
        files = " ".join(f"PATH/{f}" for f in spec.files)
        return f"stems models install {spec.id} {files} --model-dir {self.root}"

    def _install_hint(self, spec: ModelSpec) -> str:
        if pullable(spec):
            return (
                f"stems models pull {spec.id} --model-dir {self.root} (without internet: {self.install_command(spec)})"
            )
        return self.install_command(spec)

    def missing(self, spec: ModelSpec) -> str | None:
        """Why `spec` cannot run here, or None when it can (cheap: no hashing)."""
        if reason := spec.package_missing():
            return reason
        if spec.weights != "store":
            return None
        entry = self.entry(spec.id)
        if entry is None:
            return f"model {spec.id!r} is not installed in the model store {self.root}"
        for name in spec.files:
            if name not in entry["files"] or not (self.root / name).exists():
                return f"weight file {name!r} of model {spec.id!r} is missing from {self.root}"
        return None

    def resolve(self, spec: ModelSpec) -> dict[str, Path]:
        """Verified weight files of `spec` by name; raises a named error otherwise."""
        if spec.weights != "store":
            if reason := spec.package_missing():
                raise ModelNotInstalled(reason, model_id=spec.id)
            return {}
        entry = self.entry(spec.id)
        if entry is None:
            raise ModelNotInstalled(
                f"model {spec.id!r} is not installed in the model store {self.root}; "
                f"install it with: {self._install_hint(spec)}",
                model_id=spec.id,
                looked_in=str(self.root),
                files=list(spec.files),
            )
        out: dict[str, Path] = {}
        for name in spec.files:
            path = self.root / name
            pinned = entry["files"].get(name)
            if pinned is None or not path.exists():
                raise ModelNotInstalled(
                    f"weight file {name!r} of model {spec.id!r} not found at {path}; "
                    f"install it with: {self._install_hint(spec)}",
                    model_id=spec.id,
                    file=str(path),
                )
            actual = sha256_file(path)
            if actual != pinned:
                raise ChecksumMismatch(
                    f"{path} has sha256 {actual}, the manifest pins {pinned}; reinstall it with: {self._install_hint(spec)}",
                    model_id=spec.id,
                    file=str(path),
                    expected=pinned,
                    actual=actual,
                )
            out[name] = path
        return out

    def params_for(self, spec: ModelSpec) -> dict[str, Any]:
        entry = self.entry(spec.id) or {}
        return {**spec.params, **entry.get("params", {})}

    def installed(self) -> dict[str, str | None]:
        """Every registry model id -> None when usable here, else the reason it is not."""
        return {model_id: self.missing(spec) for model_id, spec in load_registry().items()}

    def verify(self) -> dict[str, str | None]:
        """Hash every installed file: model id -> None when it checks out, else the problem."""
        result: dict[str, str | None] = {}
        for model_id in self.manifest()["models"]:
            try:
                self.resolve(get_spec(model_id))
                result[model_id] = None
            except Exception as exc:  # report every problem, do not stop at the first
                result[model_id] = str(exc)
        return result

    # -- writing -----------------------------------------------------------------
    def install(self, model_id: str, paths: list[Path], params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Copy weight files in, pin their sha256 and record the model in the manifest."""
        spec = get_spec(model_id)
        if spec.weights != "store":
            raise ModelNotInstalled(f"model {model_id!r} needs no weight files ({spec.weights})", model_id=model_id)
        from .families.params import check_params

        check_params(spec, {**spec.params, **(params or {})})  # before anything is copied or written
        by_name = {Path(p).name: Path(p) for p in paths}
        if len(by_name) == 1 and len(spec.files) == 1:
            by_name = {spec.files[0]: next(iter(by_name.values()))}
        absent = [f for f in spec.files if f not in by_name]
        if absent:
            raise ModelNotInstalled(
                f"model {model_id!r} needs files {list(spec.files)}; missing {absent}", model_id=model_id
            )
        self.root.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in spec.files:
            src, dst = by_name[name], self.root / name
            if src.resolve() != dst.resolve():
                tmp = dst.with_suffix(dst.suffix + ".part")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            files[name] = sha256_file(dst)
        entry = {
            "family": spec.family,
            "files": files,
            "sample_rate": spec.sample_rate,
            "channels": spec.channels,
            "sources": list(spec.sources),
            "licence": spec.licence,
            "params": params or {},
        }
        manifest = self.manifest()
        manifest["models"][model_id] = entry
        self._write_manifest(manifest)
        return entry

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".manifest")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        os.replace(tmp, self.root / MANIFEST)
