"""The preset catalogue: preset -> chains of steps -> output stems, validated when loaded.

`catalogue/presets.json` is the single table. Each preset lists chains best first; the
first chain whose models are all installed serves the request, and later chains are the
explicit, weaker fallbacks. A chain is checked when the catalogue loads (known models,
inputs that exist, channel counts that connect, every output stem declared), not halfway
through a job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import ChainError, PresetError
from .registry import CATALOGUE_DIR, FAMILIES, ModelSpec, get_spec, load_registry

MIX = "mix"


class Ensemble(BaseModel):
    """Several installed models on one input, each of `sources` combined from all of their outputs.

    `mean_wave` averages the waveforms; `mean_magnitude` averages each STFT bin's magnitude and
    keeps the phase of the mean (see `pipelines.ensemble`), as the ensemble presets of
    python-audio-separator (avg_wave, avg_fft) and UVR do. Chosen only where preset data says so.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    models: tuple[str, ...] = Field(min_length=2)
    sources: tuple[str, ...] = Field(min_length=1)
    method: Literal["mean_wave", "mean_magnitude"] = "mean_wave"

    @model_validator(mode="after")
    def _all_produce(self) -> Ensemble:
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"ensemble {self.models} names a model twice")
        for model in self.models:
            missing = set(self.sources) - set(get_spec(model).sources)  # raises ChainError for an unknown model
            if missing:
                raise ValueError(f"ensemble model {model!r} does not produce {sorted(missing)}")
        return self


class Step(BaseModel):
    """Run one model, or an ensemble of models, on the mix or on a source an earlier step produced."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str | None = None
    ensemble: Ensemble | None = None
    input: str = MIX

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if (self.model is None) == (self.ensemble is None):
            raise ValueError("a step names either a model or an ensemble")
        if self.model is not None:
            get_spec(self.model)  # raises ChainError for an unknown model
        return self

    @property
    def models(self) -> tuple[str, ...]:
        if self.ensemble is not None:
            return self.ensemble.models
        assert self.model is not None  # one of the two, by _one_kind
        return (self.model,)

    @property
    def specs(self) -> tuple[ModelSpec, ...]:
        return tuple(get_spec(m) for m in self.models)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.ensemble.sources if self.ensemble is not None else get_spec(self.models[0]).sources

    @property
    def name(self) -> str:
        """What made this step's sources: the model id, or the ensemble's ids joined by '+'."""
        return "+".join(self.models)


class Chain(BaseModel):
    """Steps in order, and how the preset's stems are made from their sources.

    `outputs` maps a preset stem to one source name, or to a list of sources that are
    summed (e.g. instrumental = drums + bass + other); "*" keeps every source of the
    last step under its own name.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: tuple[Step, ...]
    outputs: dict[str, str | tuple[str, ...]] | Literal["*"]

    @model_validator(mode="after")
    def _connects(self) -> Chain:
        produced: dict[str, Step] = {}
        for step in self.steps:
            if step.input != MIX and step.input not in produced:
                raise ValueError(f"step {step.name!r} reads {step.input!r}, which no earlier step produces")
            for spec in step.specs:
                if step.input != MIX and spec.channels == 2 and _mono(produced[step.input]):
                    raise ValueError(f"step {spec.id!r} needs stereo but {step.input!r} is mono")
            for source in step.sources:
                if source in produced:
                    raise ValueError(
                        f"source {source!r} is produced twice (by {produced[source].name!r} and {step.name!r})"
                    )
                produced[source] = step
        if self.outputs != "*":
            for stem, sources in self.outputs.items():
                for source in (sources,) if isinstance(sources, str) else sources:
                    if source not in produced:
                        raise ValueError(f"stem {stem!r} is made from {source!r}, which no step produces")
        return self

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for s in self.steps for m in s.models))

    @property
    def queue(self) -> str:
        """The queue of the chain's first GPU family, else the CPU queue."""
        families = [FAMILIES[spec.family] for s in self.steps for spec in s.specs]
        gpu = [f.queue for f in families if f.gpu]
        return gpu[0] if gpu else families[0].queue

    def stems(self) -> tuple[str, ...]:
        return self.steps[-1].sources if self.outputs == "*" else tuple(self.outputs)

    def made_by(self, stem: str) -> str:
        """Which model made a stem: the step(s) whose sources it uses."""
        if self.outputs == "*":
            return self.steps[-1].name
        sources = self.outputs[stem]
        sources = (sources,) if isinstance(sources, str) else sources
        owners = [s.name for s in self.steps if set(s.sources) & set(sources)]
        return "+".join(dict.fromkeys(owners))


def _mono(step: Step) -> bool:
    """Whether a step's sources are mono: a mono model's are (the engine keeps the input's channels otherwise)."""
    return any(spec.channels == 1 for spec in step.specs)


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    group: str
    stems: tuple[str, ...] | None  # None: the model's sources (see mvsep_mega_53)
    chains: tuple[Chain, ...]
    drop_silent: bool = False
    usage_multiplier: float = 1.0
    prompt_guided: bool = False

    @model_validator(mode="after")
    def _stems_declared(self) -> Preset:
        if not self.chains:
            raise ValueError(f"preset {self.name!r} has no chain")
        for chain in self.chains:
            if self.stems is not None and tuple(chain.stems()) != self.stems:
                raise ValueError(
                    f"preset {self.name!r}: a chain makes {chain.stems()} but the preset declares {self.stems}"
                )
        return self

    def output_stems(self) -> tuple[str, ...]:
        return self.stems if self.stems is not None else self.chains[0].stems()

    def missing(self, model_missing: Callable[[ModelSpec], str | None]) -> dict[str, str]:
        """model id -> reason for each model that stops the *primary* chain (empty if none)."""
        return {m: r for m in self.chains[0].model_ids if (r := model_missing(get_spec(m)))}

    def pick_chain(self, model_missing: Callable[[ModelSpec], str | None]) -> tuple[int, Chain]:
        """The first chain whose models are all usable; PresetError naming what is missing otherwise."""
        absent: dict[str, str] = {}
        for index, chain in enumerate(self.chains):
            reasons = {m: r for m in chain.model_ids if (r := model_missing(get_spec(m)))}
            if not reasons:
                return index, chain
            absent.update(reasons)
        raise PresetError(
            f"preset {self.name!r} is not available on this deployment: missing models {sorted(absent)}",
            preset=self.name,
            missing_models=sorted(absent),
            reasons=absent,
        )


class RestorationPreset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    description: str
    model: str
    source: str


class PromptRoute(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    preset: str
    stems: tuple[str, ...]
    words: tuple[str, ...]


class Catalogue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    presets: tuple[Preset, ...]
    restoration_presets: tuple[RestorationPreset, ...]
    prompt_routes: tuple[PromptRoute, ...]

    @model_validator(mode="after")
    def _consistent(self) -> Catalogue:
        names = [p.name for p in self.presets]
        if len(set(names)) != len(names):
            raise ValueError("duplicate preset names")
        by_name = {p.name: p for p in self.presets}
        for route in self.prompt_routes:
            preset = by_name.get(route.preset)
            if preset is None or not set(route.stems) <= set(preset.output_stems()):
                raise ValueError(
                    f"prompt route {route.words[0]!r} points at {route.preset}:{route.stems}, which does not exist"
                )
        for r in self.restoration_presets:
            if r.source not in get_spec(r.model).sources:
                raise ValueError(f"restoration preset {r.name!r} keeps {r.source!r}, not a source of {r.model!r}")
        return self

    def preset(self, name: str) -> Preset:
        for p in self.presets:
            if p.name == name:
                return p
        raise PresetError(f"unknown preset {name!r}", preset=name, known=[p.name for p in self.presets])

    def restoration(self, name: str) -> RestorationPreset:
        for r in self.restoration_presets:
            if r.name == name:
                return r
        raise PresetError(f"unknown restoration preset {name!r}", known=[r.name for r in self.restoration_presets])

    def route_prompt(self, prompt: str) -> PromptRoute | None:
        """The installed chain a prompt names ("lead vocal", "drums", ...), if any."""
        text = " ".join(re.findall(r"[a-z0-9]+", prompt.lower()))
        for route in self.prompt_routes:
            for words in route.words:
                if re.search(rf"\b{re.escape(words)}\b", text):
                    return route
        return None

    def queues(self) -> list[str]:
        """Every queue some chain may be routed to (what a full deployment must serve)."""
        return sorted({c.queue for p in self.presets for c in p.chains} | {"cpu"})


@lru_cache(maxsize=1)
def load_catalogue() -> Catalogue:
    load_registry()
    try:
        return Catalogue.model_validate(json.loads((CATALOGUE_DIR / "presets.json").read_text()))
    except ValueError as exc:  # pydantic's ValidationError: make it our named error
        raise ChainError(f"invalid preset catalogue: {exc}") from exc
