"""The `custom` preset's audio path: stereo modes and spans around what extracts the prompted target.

What extracts the target is a routed chain (a prompt that names a stem an installed chain
makes: "drums" -> the drums of `2_tracks_drums`). The stereo mode decides what that extractor
sees, one channel-signal at a time:
- `mono`: the downmix; the target comes back in the source's channel layout;
- `left_right`: each channel on its own;
- `mid_sides`: mid (L+R)/2 and side (L-R)/2 on their own, recombined as L = m + s, R = m - s.
`spans` keep the target only inside those time ranges (seconds in the source's time base;
the selection's start is subtracted). The residual is the source minus the target, so the
two always sum back to what was split. Everything is a Signal computed per read, so memory
follows the chunk, as for every other preset.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import audio as A
from .errors import ModelNotInstalled, PresetError
from .jobspec import CustomSpec, Output, Route, TimeRange
from .presets import Chain, Preset, load_catalogue

if TYPE_CHECKING:
    from .engine import Engine, Progress

NO_ROUTE = ("this deployment has no prompt-guided model installed (SAM Audio) and the prompt names no stem an "
            "installed chain produces; try e.g. 'lead vocal', 'drums', 'bass', 'speech' or 'snare and kick'")


def plan(prompt: str, sam_model: str, stereo_mode: str, spans: list[TimeRange],
         pick: Callable[[Preset], tuple[int, Chain]]) -> CustomSpec:
    """The custom fields with the chain that serves the prompt; `pick` chooses a preset's chain where it runs.

    PresetError (field `prompt`) when nothing here can serve the prompt.
    """
    route = load_catalogue().route_prompt(prompt)
    if route is None:
        raise PresetError(NO_ROUTE, field="prompt", sam_model=sam_model)
    routed = load_catalogue().preset(route.preset)
    index, _ = pick(routed)
    return CustomSpec(prompt=prompt, sam_model=sam_model, stereo_mode=stereo_mode, spans=tuple(spans),
                      route=Route(preset=routed.name, stems=route.stems, chain_index=index))


def extract(engine: "Engine", custom: CustomSpec, mix: A.Signal, sr: int, workdir: Path | None, offset: float,
            progress: "Progress | None", cancelled: Callable[[], bool]) -> dict[str, Output]:
    """`target` and `residual` of `mix` for the prompt, each with the model that made it."""
    route = custom.route
    if route is None:
        raise ModelNotInstalled("no prompt-guided model (SAM Audio) is installed here and the prompt names no "
                                "stem an installed chain makes", prompt=custom.prompt, sam_model=custom.sam_model)
    passes = {"mono": 1, "left_right": mix.channels, "mid_sides": 2}
    mode = custom.stereo_mode if mix.channels == 2 else "mono"
    done = iter(range(passes[mode]))

    def target_of(x: A.Signal) -> tuple[A.Signal, str]:
        i, n = next(done), passes[mode]
        sub = progress and (lambda f, m: progress((i + f) / n, m))
        result = engine.run_stream(route.preset, x, sr, workdir, route.chain_index, sub, cancelled)
        parts = [result.stems[s] for s in route.stems]
        return (parts[0] if len(parts) == 1 else A.SumSignal(parts)), result.made_by[route.stems[0]]

    channels = [A.PickChannel(mix, c) for c in range(mix.channels)]
    if mode == "mono":
        mono = mix if mix.channels == 1 else A.Mixed([(c, 1 / mix.channels) for c in channels])
        target, made_by = target_of(mono)
        target = A.ChannelsSignal(target, mix.channels)
    elif mode == "left_right":
        outs = [target_of(c) for c in channels]
        target, made_by = A.StackSignal([t for t, _ in outs]), outs[0][1]
    else:
        left, right = channels
        (mid, made_by), (side, _) = target_of(A.Mixed([(left, 0.5), (right, 0.5)])), target_of(A.Mixed([(left, 0.5), (right, -0.5)]))
        target = A.StackSignal([A.Mixed([(mid, 1.0), (side, 1.0)]), A.Mixed([(mid, 1.0), (side, -1.0)])])
    if custom.spans:
        target = A.Gated(target, [(int(round((s.start - offset) * sr)), int(round((s.end - offset) * sr)))
                                  for s in custom.spans])
    residual = A.Mixed([(mix, 1.0), (target, -1.0)])
    return {"target": Output(target, made_by), "residual": Output(residual, made_by)}
