"""What a deployment may serve under the use its operator declares, from the registry's licence records.

Every model records its weights' licence, the source of that statement and whether commercial
use is allowed (`yes`, `no`, or `unclear` where the publisher says nothing). An operator who
declares `commercial` use (STEMS_DECLARED_USE) is served only the models whose record says
`yes`; chains using any other model are skipped, as if the model were not installed, and said so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from .registry import ModelSpec, get_spec, load_registry

if TYPE_CHECKING:
    from .presets import Chain

Use = Literal["research", "commercial"]


def refused(model_id: str, use: Use) -> str | None:
    """Why `use` may not be served by `model_id`, or None when its licence record allows it."""
    spec = get_spec(model_id)
    if use == "commercial" and spec.commercial_use != "yes":
        allowed = "does not allow" if spec.commercial_use == "no" else "does not clearly allow"
        return f"{model_id}: its licence ({spec.licence}) {allowed} commercial use"
    return None


def refused_models(model_ids: Iterable[str], use: Use) -> list[str]:
    """The ids among `model_ids` that `use` may not be served by, in order."""
    return [m for m in dict.fromkeys(model_ids) if refused(m, use)]


Missing = Callable[[ModelSpec], "str | None"]


def unservable(missing: Missing, use: Use) -> Missing:
    """For picking a chain: why a model cannot serve here (not installed, or its licence refuses `use`)."""
    return lambda spec: missing(spec) or refused(spec.id, use)


def install_gaps(chains: Iterable[Chain], missing: Missing, use: Use) -> list[list[str]]:
    """For each chain that `use` may be served by, the models it still needs installed (for an install hint)."""
    return [[m for m in c.model_ids if missing(get_spec(m))] for c in chains if not refused_models(c.model_ids, use)]


def licence_of(made_by: str | None) -> list[dict[str, str]] | None:
    """The licence records of the model(s) named in a stem's `made_by` ('a+b' for an ensemble)."""
    if not made_by:
        return None
    registry = load_registry()
    specs = [registry[m] for m in made_by.split("+") if m in registry]
    return [
        {"model": s.id, "licence": s.licence, "commercial_use": s.commercial_use, "source": s.licence_source}
        for s in specs
    ] or None
