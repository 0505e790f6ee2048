"""Plan a split once, for the API and the CLI alike.

A request's preset, selection, formats, restoration and custom fields, and a way to pick a chain where the
job will run, become the `SplitSpec` a worker runs and the queue and models it runs on. The callers keep
what is theirs: the API resolves the source, checks budgets and answers; the CLI reads its arguments and
picks among installed chains (and a named one). The chain is picked here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .custom import plan as plan_custom
from .errors import Invalid
from .jobspec import BitDepth, CustomSpec, HqFormat, RestorationSpec, Selection, SplitSpec
from .presets import Chain, Preset, load_catalogue
from .registry import get_spec

# a preset's chain where the job will run: (its index, the chain), or PresetError with the hint to install
Pick = Callable[[Preset], tuple[int, Chain]]


@dataclass(frozen=True)
class Plan:
    spec: SplitSpec
    queue: str  # where the job runs
    models: list[str]  # the models it runs, in order


def plan_split(
    preset: Preset,
    *,
    selection: Selection | None,
    bounds: tuple[float, float],
    bit_depth: BitDepth,
    hq_format: HqFormat | None,
    restoration: RestorationSpec | None,
    custom: CustomSpec | None,
    pick: Pick,
    model_served: Callable[[str], bool],
) -> Plan:
    """The spec, queue and models of a split of `preset`. `bounds` is the part of the source the split reads
    (seconds), which a custom request's spans must stay inside; `custom` is required for a prompt-guided
    preset; `model_served` says whether a prompt-guided model runs where the job will."""
    if preset.prompt_guided:
        if custom is None:
            raise Invalid(f"preset {preset.name!r} needs a prompt (what to extract, e.g. 'lead vocal')", field="prompt")
        lo, hi = bounds
        for span in custom.spans:
            if span.start < lo or span.end > hi:
                raise Invalid(f"span {span.start}-{span.end} s is outside the selection {lo}-{hi} s", field="spans")
        fields = plan_custom(
            custom.prompt,
            custom.sam_model,
            custom.stereo_mode,
            list(custom.spans),
            pick,
            model_served(custom.sam_model),
        )
        route = fields.route
        routed = None if route is None else load_catalogue().preset(route.preset).chains[route.chain_index]
        chain_index = None
        queue = get_spec(fields.sam_model).queue if routed is None else routed.queue
        models = [fields.sam_model] if routed is None else list(routed.model_ids)
    else:
        fields = None
        chain_index, chain = pick(preset)
        queue, models = chain.queue, list(chain.model_ids)
    spec = SplitSpec(
        preset=preset.name,
        chain_index=chain_index,
        selection=selection,
        bit_depth=bit_depth,
        hq_format=hq_format,
        custom=fields,
        restoration=restoration,
    )
    return Plan(spec, queue, models)
