"""A bounded on-disk cache of chain-step outputs, so the same separation is never run twice.

A step's output is a function of its input samples, the model's weights and parameters and
the engine's code, so that is the key: sha256 over the input's content digest, rate and
shape, the model id, its effective parameters and pinned weight hashes, and
`ENGINE_VERSION` (bumped when a change alters separated samples). Presets that share a
first step (2_tracks, acapella, instrumental and 4_tracks all start with htdemucs) thus
run it once per audio, and a second selection of the same samples reuses it too.

Layout: `root/<key[:2]>/<key>/` holds `meta.json` and one float32 (frames, channels) `.npy`
per source (the engine's FrameFile format). An entry is written under a temporary name and
renamed into place, so readers see whole entries or none, and several worker processes can
share one directory. The total size is kept under `max_bytes` by evicting the least
recently used entries; a reader that opened an entry's files keeps them readable if it is
evicted meanwhile (POSIX unlink semantics).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .signals import FrameFile, FrameWriter, Signal

ENGINE_VERSION = "2"
_STALE_TMP_S = 3600.0  # a temporary entry this old belongs to a writer that died


def step_key(
    model_id: str, input_digest: str, sample_rate: int, channels: int, frames: int, identity: dict[str, Any]
) -> str:
    """The cache key of running `model_id` (weights and params in `identity`) on an input."""
    return file_key(
        "step",
        model=model_id,
        input=input_digest,
        sample_rate=sample_rate,
        channels=channels,
        frames=frames,
        identity=identity,
    )


def file_key(kind: str, **doc: Any) -> str:
    """A cache key for anything else derived from samples (e.g. a stem's encoded files): all that decides it."""
    doc = {"engine": ENGINE_VERSION, "kind": kind, **doc}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class StepCache:
    def __init__(self, root: Path | str, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0  # step entries (get)
        self.file_hits = self.file_misses = 0  # file entries (get_files)

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> dict[str, Signal] | None:
        """The entry's sources as open FrameFiles, or None (a miss, or an entry evicted while opening)."""
        entry = self._dir(key)
        try:
            meta = json.loads((entry / "meta.json").read_text())
            out: dict[str, Signal] = {}
            for source, info in meta["sources"].items():
                out[source] = FrameFile(entry / info["file"], peak=info["peak"], digest=info["digest"])
            os.utime(entry / "meta.json")  # least recently *used* goes first
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, KeyError):
            self.misses += 1
            return None
        self.hits += 1
        return out

    def get_files(self, key: str, into: Path) -> dict[str, Path] | None:
        """A file entry's files, hard-linked (or copied) into `into` so eviction cannot take them; None on a miss."""
        entry = self._dir(key)
        try:
            meta = json.loads((entry / "meta.json").read_text())
            into.mkdir(parents=True, exist_ok=True)
            out = {}
            for name, file in meta["files"].items():
                dest = into / file
                _link_or_copy(entry / file, dest)
                out[name] = dest
            os.utime(entry / "meta.json")
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, KeyError):
            self.file_misses += 1
            return None
        self.file_hits += 1
        return out

    def put_files(self, key: str, files: dict[str, Path]) -> bool:
        """Store finished files (hard links where possible) under `key`; False when not stored."""
        size = sum(p.stat().st_size for p in files.values())
        return self._commit(
            key, size, lambda tmp: {"files": {name: _put_file(p, tmp, i) for i, (name, p) in enumerate(files.items())}}
        )

    def put(self, key: str, outputs: dict[str, Signal]) -> bool:
        """Store a step's outputs (hard links to FrameFiles where possible); False when not stored."""
        size = sum(o.frames * o.channels * 4 for o in outputs.values())

        def write(tmp: Path) -> dict[str, Any]:
            sources: dict[str, dict[str, Any]] = {}
            for i, (source, signal) in enumerate(outputs.items()):
                name = f"{i}.npy"
                sources[source] = _store_signal(signal, tmp / name)
                sources[source]["file"] = name
            return {"sources": sources}

        return self._commit(key, size, write)

    def _commit(self, key: str, size: int, write: Callable[[Path], dict[str, Any]]) -> bool:
        """Write an entry under a temporary name and rename it into place (see the module docstring)."""
        if size > self.max_bytes:
            return False
        final = self._dir(key)
        if (final / "meta.json").exists():
            return True
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            meta = {"key": key, "engine": ENGINE_VERSION, "created": time.time(), "bytes": size, **write(tmp)}
            (tmp / "meta.json").write_text(json.dumps(meta))
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:  # another process stored the same key first: theirs is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.evict()
        return True

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, directory) of every complete entry."""
        found = []
        for shard in self.root.iterdir():
            if shard.name.startswith(".") or not shard.is_dir():
                continue
            for entry in shard.iterdir():
                try:
                    st = (entry / "meta.json").stat()
                    size = sum(f.stat().st_size for f in entry.iterdir())
                except (FileNotFoundError, NotADirectoryError):
                    continue
                found.append((st.st_mtime, size, entry))
        return found

    def size(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, max_bytes: int | None = None) -> int:
        """Remove least recently used entries until the total is under the bound; the bytes freed."""
        bound = self.max_bytes if max_bytes is None else max_bytes
        entries = sorted(self.entries())
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, entry in entries:
            if total <= bound:
                break
            trash = self.root / f".evict-{uuid.uuid4().hex}"
            try:
                os.rename(entry, trash)  # gone for readers at once; deleted below
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            freed += size
        self._sweep()
        return freed

    def _sweep(self) -> None:
        now = time.time()
        for p in self.root.glob(".tmp-*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass
        for p in self.root.glob(".evict-*"):
            shutil.rmtree(p, ignore_errors=True)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except FileExistsError:
        dest.unlink()
        _link_or_copy(src, dest)
    except OSError as exc:  # another filesystem (or no hard links there)
        if isinstance(exc, FileNotFoundError):
            raise
        shutil.copyfile(src, dest)


def _put_file(path: Path, tmp: Path, i: int) -> str:
    name = f"{i}{''.join(path.suffixes[-1:])}"
    _link_or_copy(path, tmp / name)
    return name


def _store_signal(signal: Signal, dest: Path) -> dict[str, Any]:
    """Put `signal` at `dest` (a hard link to its file when it is one); its peak and digest."""
    path = getattr(signal, "path", None)
    if isinstance(signal, FrameFile) and signal.digest is not None and path is not None and path.exists():
        _link_or_copy(path, dest)
        return {"peak": signal.peak, "digest": signal.digest}
    writer = FrameWriter(dest, signal.channels, signal.frames, digest=True)
    for _, block in signal.blocks():
        writer.write(block)
    stored = writer.close()
    stored.close()
    return {"peak": stored.peak, "digest": stored.digest}
