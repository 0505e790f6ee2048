"""The `custom` preset's audio path: stereo modes and spans around what extracts the prompted target.

Two things can extract a prompted target:
- a prompt-guided model (SAM Audio, `Engine.stream_prompted`): the prompt as given, `spans`
  as its positive span anchors in the selection's time base; it makes target and residual;
- a routed chain, when the prompt names a stem an installed chain makes ("drums" -> the
  drums of `2_tracks_drums`): `spans` keep the target only inside those ranges, and the
  residual is the source minus the target, so the two sum back to what was split.
The stereo mode decides what the extractor hears, one channel-signal at a time:
- `mono`: the downmix; the stems come back in the source's channel layout;
- `left_right`: each channel on its own;
- `mid_sides`: mid (L+R)/2 and side (L-R)/2 on their own, recombined as L = m + s, R = m - s.
Everything is a Signal computed per read, so memory follows the chunk, as for every preset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from . import signals as S
from .errors import PresetError
from .jobspec import CustomSpec, Output, Route, TimeRange
from .presets import Chain, Preset, load_catalogue
from .progress import Progress, part_of

if TYPE_CHECKING:
    from .engine import Engine

NO_ROUTE = (
    "this deployment has no prompt-guided model installed ({sam_model} is on no worker; "
    "{hint}) and the prompt names no stem an installed chain produces; try e.g. 'lead vocal', 'drums', "
    "'bass', 'speech' or 'snare and kick'"
)

# (target, the model's own residual or None, made_by) of one channel-signal
Extractor = Callable[[S.Signal, "Progress | None"], tuple[S.Signal, "S.Signal | None", str]]


def plan(
    prompt: str,
    sam_model: str,
    stereo_mode: str,
    spans: list[TimeRange],
    pick: Callable[[Preset], tuple[int, Chain]],
    sam_available: bool,
) -> CustomSpec:
    """Who serves a prompt: the chain of the stem it names, when that chain runs here (or no SAM model
    does), else the SAM model. `pick` chooses a preset's chain where the job will run.

    PresetError (field `prompt`) when nothing here can serve the prompt.
    """
    from .install_hint import install_hint

    fields = dict(prompt=prompt, sam_model=sam_model, stereo_mode=stereo_mode, spans=tuple(spans))
    route = load_catalogue().route_prompt(prompt)
    if route is not None:
        routed = load_catalogue().preset(route.preset)
        try:
            index, _ = pick(routed)
            return CustomSpec(**fields, route=Route(preset=routed.name, stems=route.stems, chain_index=index))
        except PresetError:
            if not sam_available:
                raise
    if sam_available:
        return CustomSpec(**fields)
    raise PresetError(
        NO_ROUTE.format(sam_model=sam_model, hint=install_hint([sam_model])), field="prompt", sam_model=sam_model
    )


def span_anchors(spans: Iterable[TimeRange], offset: float = 0.0) -> list[tuple[str, float, float]]:
    """Spans (seconds of the source) as SAM Audio's "+" anchors in the selection's time base."""
    return [("+", s.start - offset, s.end - offset) for s in spans]


def extract(
    engine: Engine,
    custom: CustomSpec,
    mix: S.Signal,
    sr: int,
    workdir: Path | None,
    offset: float,
    progress: Progress | None,
    cancelled: Callable[[], bool],
) -> dict[str, Output]:
    """`target` and `residual` of `mix` (the selection; it starts `offset` s into the source) for the prompt."""
    route = custom.route
    if route is None:
        anchors = span_anchors(custom.spans, offset)

        def part(x: S.Signal, sub: Progress | None) -> tuple[S.Signal, S.Signal | None, str]:
            out = engine.stream_prompted(custom.sam_model, x, sr, workdir, custom.prompt, anchors, sub, cancelled)
            return out["target"], out["residual"], custom.sam_model
    else:

        def part(x: S.Signal, sub: Progress | None) -> tuple[S.Signal, S.Signal | None, str]:
            result = engine.run_stream(route.preset, x, sr, workdir, route.chain_index, sub, cancelled)
            stems = [result.stems[s] for s in route.stems]
            return (stems[0] if len(stems) == 1 else S.SumSignal(stems)), None, result.made_by[route.stems[0]]

    target, residual, made_by = by_stereo_mode(mix, custom.stereo_mode, part, progress)
    if residual is None:  # a routed chain: spans gate the target, the residual is what is left of the source
        if custom.spans:
            target = S.Gated(
                target, [(round((s.start - offset) * sr), round((s.end - offset) * sr)) for s in custom.spans]
            )
        residual = S.Mixed([(mix, 1.0), (target, -1.0)])
    return {"target": Output(target, made_by), "residual": Output(residual, made_by)}


def by_stereo_mode(
    mix: S.Signal, mode: str, part: Extractor, progress: Progress | None
) -> tuple[S.Signal, S.Signal | None, str]:
    """Run `part` on what the stereo mode has it hear, and put its outputs back in `mix`'s channel layout."""
    if mix.channels != 2:
        mode = "mono"
    channels: list[S.Signal] = [S.PickChannel(mix, c) for c in range(mix.channels)]
    options: dict[str, list[S.Signal]] = {
        "mono": [mix if mix.channels == 1 else S.Mixed([(c, 1 / mix.channels) for c in channels])],
        "left_right": channels,
        "mid_sides": [
            S.Mixed([(channels[0], 0.5), (channels[1], 0.5)]),
            S.Mixed([(channels[0], 0.5), (channels[1], -0.5)]),
        ]
        if mix.channels == 2
        else [],
    }
    inputs = options[mode]
    outs = [part(x, part_of(progress, i / len(inputs), 1 / len(inputs))) for i, x in enumerate(inputs)]

    def layout(signals: list[S.Signal]) -> S.Signal:
        if mode == "mono":
            return S.ChannelsSignal(signals[0], mix.channels)
        if mode == "left_right":
            return S.StackSignal(signals)
        mid, side = signals
        return S.StackSignal([S.Mixed([(mid, 1.0), (side, 1.0)]), S.Mixed([(mid, 1.0), (side, -1.0)])])

    target = layout([t for t, _, _ in outs])
    residual = None if outs[0][1] is None else layout([r for _, r, _ in outs if r is not None])
    return target, residual, outs[0][2]
