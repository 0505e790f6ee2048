"""`stems split`: the worker's own split (`pipelines.split.run`) on a local file, stems into a directory.

The options are the API's fields: selection, bit depth, HQ format, the `custom` fields,
restoration, and which chain to run (a fallback, say). The job is planned here against the
local model store, as the API plans it against the workers' reports, and then runs exactly
the code a worker runs, streaming, so memory follows the chunk and not the track.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, overload

from pipelines.engine import Engine
from pipelines.errors import PresetError, StemsError, UsageError
from pipelines.install_hint import install_hint, preset_hint
from pipelines.jobspec import CustomSpec, RestorationSpec, Selection, SplitSpec, TimeRange
from pipelines.licences import Use, install_gaps, refused_models, unservable
from pipelines.modelstore import ModelStore
from pipelines.plan import plan_split
from pipelines.presets import Chain, Preset, load_catalogue
from pipelines.registry import get_spec
from pipelines.stemfile import NI_ORDER, write_stem_mp4

if TYPE_CHECKING:
    from .settings import Settings


@overload
def time_range(text: str, what: str) -> TimeRange: ...
@overload
def time_range(text: str, what: str, model: type[Selection]) -> Selection: ...
def time_range(text: str, what: str, model: type[TimeRange | Selection] = TimeRange) -> TimeRange | Selection:
    """`START:END` in seconds; for a selection either side may be empty (the start, the end)."""
    start, _, end = text.partition(":")
    try:
        return model(start=float(start or 0), end=float(end) if end else None)
    except ValueError as exc:
        raise UsageError(f"{what} {text!r}: give START:END in seconds, START before END") from exc


def restoration(text: str) -> RestorationSpec:
    """`PRESET[:STRENGTH]`."""
    name, _, strength = text.partition(":")
    try:
        load_catalogue().restoration(name)
        return RestorationSpec(preset=name, strength=float(strength) if strength else 1.0)
    except PresetError as exc:
        raise UsageError(f"--restore {text!r}: {exc.message}") from None
    except ValueError as exc:
        raise UsageError(f"--restore {text!r}: STRENGTH is a number from 0 to 1 ({exc.__class__.__name__})") from None


def pick(preset: Preset, store: ModelStore, chain: str | None, use: Use) -> int:
    """The chain to run: the first installed one whose licences allow `use` (STEMS_DECLARED_USE, as the API
    serves), or the one `chain` names (its index, or its models joined by '+')."""
    skipped = refused_models([m for c in preset.chains for m in c.model_ids], use)
    if chain is None:
        try:
            return preset.pick_chain(unservable(store.missing, use))[0]
        except PresetError as exc:
            hint = preset_hint(install_gaps(preset.chains, store.missing, use))
            message = exc.message + (
                f" (chains of {', '.join(skipped)} are skipped: their licence does not allow "
                f"{use} use, STEMS_DECLARED_USE)"
                if skipped
                else ""
            )
            raise PresetError(f"{message}; to make it available: {hint}" if hint else message, **exc.fields) from None
    names = ["+".join(c.model_ids) for c in preset.chains]
    index = int(chain) if chain.isdigit() else names.index(chain) if chain in names else None
    if index is None or index >= len(preset.chains):
        raise UsageError(
            f"preset {preset.name!r} has no chain {chain!r}; its chains: "
            + ", ".join(f"{i}={n}" for i, n in enumerate(names))
        )
    refusing = refused_models(preset.chains[index].model_ids, use)
    if refusing:
        raise PresetError(
            f"chain {names[index]!r} of preset {preset.name!r} is not served for {use} use "
            f"(STEMS_DECLARED_USE): the licence of {', '.join(refusing)} does not allow it",
            preset=preset.name,
            licence_refused=sorted(skipped),
        )
    missing = {m: r for m in preset.chains[index].model_ids if (r := store.missing(get_spec(m)))}
    if missing:
        raise PresetError(
            f"chain {names[index]!r} of preset {preset.name!r} cannot run here: "
            + "; ".join(missing.values())
            + f"; to make it available: {install_hint(missing)}",
            preset=preset.name,
            missing_models=sorted(missing),
        )
    return index


def plan(args: argparse.Namespace, store: ModelStore, use: Use) -> SplitSpec:
    """The spec `stems split` runs: its arguments through the same planner as the API (pipelines/plan.py)."""
    preset = load_catalogue().preset(args.preset)
    selection = time_range(args.selection, "--selection", Selection) if args.selection else None
    custom = None
    if preset.prompt_guided:
        if not args.prompt or not args.prompt.strip():
            raise UsageError(f"preset {preset.name!r} needs --prompt (what to extract, e.g. 'lead vocal')")
        spans = tuple(time_range(s, "--spans") for s in args.spans.split(",")) if args.spans else ()
        custom = CustomSpec(
            prompt=args.prompt.strip(), sam_model=args.sam_model, stereo_mode=args.stereo_mode, spans=spans
        )
    elif args.prompt or args.spans:
        raise UsageError("--prompt and --spans are for the custom preset only")

    def chain_here(p: Preset) -> tuple[int, Chain]:
        index = pick(p, store, args.chain, use)
        return index, p.chains[index]

    return plan_split(
        preset,
        selection=selection,
        bounds=(selection.start, selection.end or float("inf")) if selection else (0.0, float("inf")),
        bit_depth=args.bit_depth,
        hq_format=None if args.hq == "none" else args.hq,
        restoration=restoration(args.restore) if args.restore else None,
        custom=custom,
        pick=chain_here,
        model_served=lambda model_id: store.missing(get_spec(model_id)) is None,
    ).spec


def run(args: argparse.Namespace, store: ModelStore, settings: Settings) -> int:
    from tqdm import tqdm

    from pipelines import split

    source, out = Path(args.file), Path(args.out)
    try:
        if not source.is_file():
            raise UsageError(f"{source} is not a file")
        spec = plan(args, store, settings.declared_use)
        makes = set(load_catalogue().preset(spec.preset).output_stems())
        if getattr(args, "stem_mp4", False) and not set(NI_ORDER) <= makes:
            raise UsageError(
                f"--stem-mp4 needs a preset that makes drums, bass, other and vocals (4_tracks); {spec.preset} does not"
            )
        engine = Engine(store, device=args.device or settings.device, chunk_seconds=settings.chunk_seconds)
        out.mkdir(parents=True, exist_ok=True)
        # scratch beside the outputs: same disk, so finished files are renamed, not copied (and not in a RAM /tmp)
        with (
            tempfile.TemporaryDirectory(prefix=".stems-work-", dir=out) as work,
            tqdm(
                total=100,
                unit="%",
                desc=spec.preset,
                file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
            ) as bar,
        ):
            written = []

            def progress(fraction: float, stage: str) -> None:
                bar.set_postfix_str(stage, refresh=False)
                bar.update(max(0, int(fraction * 100) - bar.n))

            def deliver(product: split.Product) -> None:
                for path in filter(None, (product.wav, product.hq)):
                    dest = out / f"{product.name}{path.suffix}"
                    shutil.move(path, dest)
                    written.append((dest, product.made_by))

            split.run(engine, spec, source, Path(work), deliver, progress)
            bar.update(100 - bar.n)
        if getattr(args, "stem_mp4", False):  # NI's Stem format for DJ software, from the WAVs just written
            wavs = {p.stem: p for p, _ in written if p.suffix == ".wav"}
            dest = out / f"{source.name.split('.')[0]}.stem.mp4"
            written.append((write_stem_mp4(dest, {n: wavs[n] for n in NI_ORDER if n in wavs}), "stem.mp4"))
        for path, made_by in sorted(written):
            print(f"{path}\t{made_by}")
    except StemsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
