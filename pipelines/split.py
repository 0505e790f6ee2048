"""One split, start to finish, for the worker and the local CLI alike: decode, separate, restore, encode.

`run` is `separate_all` then `deliver_all` in one process. A worker may run them as two stages
on two machines (separation on a GPU worker, the encodes on a CPU one): `materialize` writes
the separated samples as float32 files for the second stage, which reads them back bit for
bit, so both ways give the same files.

`run` decodes the selection block by block into a scratch file, separates it chunk by chunk
(`Engine.run_stream`, or `pipelines.custom` for the prompt-guided preset), restores each stem
when asked, and writes each stem's WAV and HQ copy block by block, so memory follows the
chunk and the model, not the track. Each finished file set is handed to `deliver` (the worker
uploads it and records it; the CLI moves it into the output directory). Nothing here knows
where the source came from or where the stems go.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import audio as A, custom, signals as S
from .cache import file_key
from .engine import Engine
from .errors import Cancelled
from .jobspec import Output, SplitSpec
from .peaks import FORM as PEAKS_FORM, PeakAccumulator
from .presets import load_catalogue
from .progress import Progress

STORE_BLOCK_S = 10  # seconds of a stem written per block
ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))  # stems encoded at once (encoders release the GIL)

# where the stages sit on the job's 0..1 progress scale (restoration, when asked, runs from RESTORING)
DECODED, RESTORING, SEPARATED, ENCODED = 0.05, 0.65, 0.8, 1.0


@dataclass
class Product:
    """One stem's encoded files, ready to deliver. `of` names the stem a restored copy restores."""

    name: str
    of: str | None
    wav: Path
    hq: Path | None
    peaks: Path  # waveform peaks, audiowaveform JSON (pipelines/peaks.py)
    made_by: str
    frames: int
    channels: int
    sample_rate: int


@dataclass
class Done:
    """What a finished split made: the model behind each stem, and the length of what was split."""

    made_by: dict[str, str]
    frames: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def _never() -> bool:
    return False


def _check(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled("job cancelled")


def decode_selection(source: Path, workdir: Path, spec: SplitSpec, digest: bool = False) -> tuple[S.FrameFile, int]:
    return A.decode_to_file(source, workdir / "mix.npy", spec.start, spec.end, digest=digest)


def separate(
    engine: Engine,
    spec: SplitSpec,
    mix: S.Signal,
    sr: int,
    workdir: Path | None,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] = _never,
) -> dict[str, Output]:
    """The stems of `spec` as {name: Output}; `custom` runs its stereo mode and spans around the extractor."""
    if spec.custom is not None:
        return custom.extract(engine, spec.custom, mix, sr, workdir, spec.start, progress, cancelled)
    result = engine.run_stream(spec.preset, mix, sr, workdir, spec.chain_index, progress, cancelled)
    return {name: Output(signal, result.made_by[name]) for name, signal in result.stems.items()}


def restore(
    engine: Engine, spec: SplitSpec, stem: Output, sr: int, workdir: Path | None, cancelled: Callable[[], bool] = _never
) -> Output:
    """The restored copy of a stem: `strength` x restored + (1 - strength) x the stem."""
    assert spec.restoration is not None  # called only for a spec that asks for restoration
    preset = load_catalogue().restoration(spec.restoration.preset)
    wet = engine.stream_model(preset.model, stem.signal, sr, workdir, cancelled=cancelled)[preset.source]
    s = spec.restoration.strength
    return Output(S.Mixed([(wet, s), (stem.signal, 1.0 - s)]), preset.model)


def encode(
    engine: Engine, signal: S.Signal, sr: int, dest: Path, bit_depth: int, hq_format: str | None
) -> tuple[Path, Path | None, Path]:
    """`dest`.wav, its HQ copy and its waveform peaks, written block by block in one pass over the signal.

    With a step cache, encoded files are cached too, keyed by the samples and the encoding
    settings: a stem another job already made (acapella's vocals are 4_tracks' vocals) is
    copied from the cache instead of encoded again.
    """
    cache, key = engine.cache, None
    if cache is not None:
        key = file_key(
            "stem-files",
            samples=S.content_digest(signal),
            sample_rate=sr,
            channels=signal.channels,
            frames=signal.frames,
            bit_depth=bit_depth,
            hq_format=hq_format,
            encoder=A.encoder_identity(),
            peaks=PEAKS_FORM,
        )
        hit = cache.get_files(key, dest.parent / f"{dest.name}-cached")
        if hit is not None:
            return hit["wav"], hit.get("hq"), hit["peaks"]
    wav = dest.with_name(dest.name + ".wav")
    hq = dest.with_name(f"{dest.name}.{A.hq_extension(hq_format)}") if hq_format else None
    peaks = PeakAccumulator(sr, signal.channels, signal.frames)
    with (
        A.WavWriter(wav, sr, signal.channels, bit_depth) as w,
        A.HqEncoder(hq, sr, signal.channels, hq_format) if hq and hq_format else contextlib.nullcontext() as encoder,
    ):
        for _, block in signal.blocks(STORE_BLOCK_S * sr):
            w.write(block)
            peaks.feed(block)
            if encoder is not None:
                encoder.write(block)
    peaks_path = peaks.write(dest.with_name(dest.name + ".peaks.json"))
    if key is not None and cache is not None:
        cache.put_files(key, {"wav": wav, "peaks": peaks_path, **({"hq": hq} if hq is not None else {})})
    return wav, hq, peaks_path


def encode_all(
    engine: Engine,
    spec: SplitSpec,
    items: list[tuple[str, str | None, Output]],
    sr: int,
    workdir: Path,
    deliver: Callable[[Product], None],
    progress: Progress | None,
    cancelled: Callable[[], bool],
    at: float,
    span: float,
) -> None:
    """Encode and deliver several stems at once, on up to ENCODE_THREADS threads.

    A failure (or a cancellation, checked before each stem starts) stops stems not yet
    started; it is raised once the running ones have finished, so nothing is delivered after it.
    """
    if not items:
        return

    def one(name: str, of: str | None, out: Output) -> None:
        _check(cancelled)
        wav, hq, peaks = encode(engine, out.signal, sr, workdir / f"out-{name}", spec.bit_depth, spec.hq_format)
        deliver(Product(name, of, wav, hq, peaks, out.made_by, out.signal.frames, out.signal.channels, sr))

    with ThreadPoolExecutor(max(1, min(len(items), ENCODE_THREADS)), thread_name_prefix="encode") as pool:
        futures = {pool.submit(one, *item): item[0] for item in items}
        try:
            for i, future in enumerate(as_completed(futures)):
                future.result()
                if progress:
                    progress(at + span * (i + 1) / len(items), f"stored {futures[future]}")
        except BaseException:
            for f in futures:
                f.cancel()
            raise


@dataclass
class Separated:
    """A separation's outputs before encoding: (name, of, Output) items, stems first, then restored copies.

    The items may read the decoded mix (a residual stem is mix minus the others), so it is held
    here too; `close` releases both.
    """

    items: list[tuple[str, str | None, Output]]
    done: Done
    mix: S.Signal | None  # None when the items came from stored files (a delivery stage)
    held: list[S.Signal]  # every signal made, kept or not (a kept stem may read one that is not)

    def close(self) -> None:
        for signal in self.held:
            signal.close()
        if self.mix is not None:
            self.mix.close()


def separate_all(
    engine: Engine,
    spec: SplitSpec,
    source: Path,
    workdir: Path,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] = _never,
    wanted: set[str] | None = None,
) -> Separated:
    """Decode the selection, separate it and restore each kept stem when asked: everything but the encodes.

    `wanted` limits the items to those stem names (the worker's records). A preset that drops
    silent stems makes fewer than it declares: `Done.made_by` lists those it made.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(0.0, "decoding")
    mix, sr = decode_selection(source, workdir, spec, digest=engine.cache is not None)
    stems: dict[str, Output] = {}
    try:
        restoring = spec.restoration is not None
        until = RESTORING if restoring else SEPARATED
        if progress:
            progress(DECODED, "separating")
        stems = separate(
            engine,
            spec,
            mix,
            sr,
            workdir,
            progress and (lambda f, m: progress(DECODED + (until - DECODED) * f, f"separating ({m})")),
            cancelled,
        )
        _check(cancelled)
        items: list[tuple[str, str | None, Output]] = [
            (name, None, out) for name, out in stems.items() if wanted is None or name in wanted
        ]
        if restoring:
            for i, (name, _, out) in enumerate(list(items)):
                _check(cancelled)
                if progress:
                    progress(RESTORING + (SEPARATED - RESTORING) * i / len(items), f"restoring {name}")
                items.append((f"{name}_restored", name, restore(engine, spec, out, sr, workdir, cancelled)))
        held = [out.signal for out in stems.values()] + [out.signal for _, of, out in items if of is not None]
        return Separated(items, Done({name: out.made_by for name, out in stems.items()}, mix.frames, sr), mix, held)
    except BaseException:
        for out in stems.values():
            out.signal.close()
        mix.close()
        raise


def deliver_all(
    engine: Engine,
    spec: SplitSpec,
    separated: Separated,
    workdir: Path,
    deliver: Callable[[Product], None],
    progress: Progress | None = None,
    cancelled: Callable[[], bool] = _never,
) -> Done:
    """Encode every item of a separation (WAV at its bit depth, HQ copy, peaks) and deliver each."""
    if progress:
        progress(SEPARATED, "encoding")
    encode_all(
        engine,
        spec,
        separated.items,
        separated.done.sample_rate,
        workdir,
        deliver,
        progress,
        cancelled,
        SEPARATED,
        ENCODED - SEPARATED,
    )
    return separated.done


def run(
    engine: Engine,
    spec: SplitSpec,
    source: Path,
    workdir: Path,
    deliver: Callable[[Product], None],
    progress: Progress | None = None,
    cancelled: Callable[[], bool] = _never,
    wanted: set[str] | None = None,
) -> Done:
    """Split `source` as `spec` asks in one process, delivering each stem and restored copy as it is encoded."""
    separated = separate_all(engine, spec, source, workdir, progress, cancelled, wanted)
    try:
        _check(cancelled)
        return deliver_all(engine, spec, separated, workdir, deliver, progress, cancelled)
    finally:
        separated.close()


def materialize(separated: Separated, workdir: Path) -> list[tuple[str, str | None, str, Path]]:
    """Each item as a float32 .npy FrameFile of its own: (name, of, made_by, path), for a later delivery stage.

    The samples are the ones `deliver_all` would encode (float32 written and read back
    bit for bit), so a job split in two stages gives the files a one-stage job gives.
    """
    files = []
    for name, of, out in separated.items:
        writer = S.FrameWriter(workdir / f"separated-{name}.npy", out.signal.channels, out.signal.frames)
        try:
            for _, block in out.signal.blocks(STORE_BLOCK_S * separated.done.sample_rate):
                writer.write(block)
        except BaseException:
            writer.abandon()
            raise
        writer.close().close()
        files.append((name, of, out.made_by, writer.path))
    return files
