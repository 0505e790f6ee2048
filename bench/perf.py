"""Performance of the split path (`make bench`): memory, overhead, the demucs CLI, selections, shared work, loading.

Every figure is a ratio of two measurements taken in this one run on inputs the benchmark
generates, with timings interleaved (reference, ours, reference), because the machine may be
shared: bare seconds would measure the neighbours as much as the code. Demucs figures use a
randomly initialised htdemucs of the released architecture (`tools.random_models`, size
"full", about 42M parameters): it costs what the real model costs, though its output is noise.

How the worker's code is run:
- memory figures: a fresh subprocess per split that builds the real worker context
  (`workers.context.context()`, configured by environment as a worker is) and runs
  `workers.splitter.run_split` end to end: download from (local) storage, decode, separate,
  WAV and HQ encodes, upload; its peak RSS is `getrusage(RUSAGE_SELF).ru_maxrss`, model
  load and imports included;
- timing figures: `run_split` in this process against a private Redis and local storage,
  with a warm engine (what one worker process does for its second and later jobs); time is
  from the call (the job dequeued) to its return (stems and HQ encodes stored, job complete).

Writes bench/results.json and prints the table. `--quick` shortens the inputs (for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SR = 44100
RESULTS = ROOT / "bench" / "results.json"


# -- inputs -----------------------------------------------------------------------------------
def write_music(path: Path, seconds: float, seed: int, subtype: str = "PCM_16") -> Path:
    """A stereo test track written block by block: a centred melody, panned chords, noise bursts, a pause.

    Deterministic per seed; never held whole in memory, so an hour costs the generator nothing.
    """
    import soundfile as sf

    rng = np.random.default_rng(seed)
    fmt = "FLAC" if path.suffix == ".flac" else "WAV"
    n = int(round(seconds * SR))
    block = 10 * SR
    with sf.SoundFile(str(path), "w", SR, 2, subtype, format=fmt) as f:
        for lo in range(0, n, block):
            t = np.arange(lo, min(n, lo + block)) / SR
            note = 220.0 * 2 ** (np.floor(t / 0.5) % 12 / 12)
            centre = 0.25 * np.sin(2 * np.pi * note * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            left = 0.15 * np.sin(2 * np.pi * 440 * t + 1.0)
            right = 0.15 * np.sin(2 * np.pi * 523 * t)
            noise = 0.05 * rng.standard_normal((2, t.size)) * (np.sin(2 * np.pi * 2 * t) > 0.5)
            x = np.stack([centre + left, centre + right]) + noise
            f.write(np.clip(x, -1, 1).T.astype(np.float32))
    return path


# -- the worker's code, in this process ---------------------------------------------------------
class Worker:
    """One worker process's resources (as workers.context builds them) on a private Redis and local storage."""

    def __init__(
        self, root: Path, redis_url: str, model_dir: Path, cache: bool, chunk_seconds: float = 30.0, device: str = "cpu"
    ) -> None:
        from pipelines.cache import StepCache
        from pipelines.engine import Engine
        from pipelines.modelstore import ModelStore
        from stems.jobstore import JobStore
        from stems.settings import Settings
        from stems.storage import LocalStorage
        from workers.context import WorkerContext

        root.mkdir(parents=True, exist_ok=True)
        models = ModelStore(model_dir)
        self.ctx = WorkerContext(
            settings=Settings(data_dir=root, redis_url=redis_url, storage="local", model_dir=model_dir),
            store=JobStore.from_url(redis_url, f"b{uuid.uuid4().hex[:8]}"),
            storage=LocalStorage(root / "objects"),
            models=models,
            engine=Engine(
                models,
                device=device,
                chunk_seconds=chunk_seconds,
                cache=StepCache(root / "cache", 20 << 30) if cache else None,
            ),
            scratch_dir=root / "work",
        )
        self._assets: dict[Path, str] = {}
        self.jobs: list[dict] = []  # every split this worker ran: seconds, load_seconds

    def submit(
        self,
        path: Path,
        preset: str,
        selection: tuple[float, float] | None = None,
        hq: str = "aac",
        bit_depth: int = 24,
    ) -> str:
        return create_job(self.ctx, path, preset, selection, hq, bit_depth, self._assets)

    def split(self, job_id: str) -> dict:
        """Run one job; its wall time and the model-loading time inside it."""
        from stems.models import JobStatus
        from workers.splitter import run_split

        loaded = self.ctx.engine.load_seconds
        t0, c0 = time.perf_counter(), time.process_time()
        run_split(job_id, self.ctx, "bench")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        job = self.ctx.store.get_job(job_id)
        if job.status != JobStatus.complete:
            raise RuntimeError(f"bench job {job_id} ended {job.status.value}: {job.error}")
        self.jobs.append(
            {"seconds": seconds, "cpu_seconds": cpu, "load_seconds": self.ctx.engine.load_seconds - loaded}
        )
        return self.jobs[-1]


def create_job(ctx, path: Path, preset: str, selection, hq: str, bit_depth: int, assets: dict | None = None) -> str:
    """Upload `path` (once) and record a job and its stems as POST /create-stems does."""
    from pipelines import audio as A
    from pipelines.jobspec import SplitSpec
    from pipelines.presets import load_catalogue
    from stems.models import AssetStatus, AudioAsset, Job

    assets = {} if assets is None else assets
    if path not in assets:
        info = A.probe(path)
        asset = AudioAsset(
            user_id="bench",
            origin="upload",
            status=AssetStatus.complete,
            object_key=f"bench/{uuid.uuid4().hex}{path.suffix}",
            info=info.to_dict(),
        )
        ctx.storage.put_file(asset.object_key, path)
        ctx.store.put_asset(asset)
        assets[path] = asset.id
    asset_id = assets[path]
    duration = ctx.store.get_asset(asset_id).info["duration"]
    p = load_catalogue().preset(preset)
    index, chain = p.pick_chain(ctx.models.missing)
    start, end = (0.0, duration) if selection is None else selection
    spec = SplitSpec(
        preset=preset,
        chain_index=index,
        bit_depth=bit_depth,
        hq_format=None if hq == "none" else hq,
        selection=None if selection is None else {"start": start, "end": end},
    )
    job = Job(
        user_id="bench",
        audio_id=asset_id,
        source_kind="audio",
        source_id=asset_id,
        spec=spec,
        queue=chain.queue,
        audio_seconds=end - start,
    )
    stems, _ = job.make_stems(p.output_stems())
    ctx.store.create_job(job, stems)
    return job.id


# -- the worker's code, in a fresh process (memory) -------------------------------------------------
def child_split(args) -> int:
    """Entry of the memory subprocess: the real worker context from the environment, one job, peak RSS."""
    from stems.models import JobStatus
    from workers.context import context
    from workers.splitter import run_split

    t0 = time.perf_counter()
    ctx = context()
    job_id = create_job(ctx, Path(args.source), args.preset, None, args.hq, 24)
    run_split(job_id, ctx, "bench-child")
    job = ctx.store.get_job(job_id)
    out = {
        "status": job.status.value,
        "error": job.error,
        "seconds": time.perf_counter() - t0,
        "load_seconds": ctx.engine.load_seconds,
        "device": ctx.engine.device,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if ctx.engine.device.startswith("cuda"):  # the model's activations live on the GPU, not in the RSS
        import torch

        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out), flush=True)
    return 0 if job.status == JobStatus.complete else 1


def prepare_in_child(model_dir: Path, model_id: str) -> None:
    """Load `model_id` once in a child process: builds its derived files into the store."""
    code = (
        "import sys; from pipelines.engine import Engine; from pipelines.modelstore import ModelStore; "
        "Engine(ModelStore(sys.argv[1])).separator(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(model_dir), model_id], cwd=ROOT, check=True)


def run_child(
    tmp: Path, redis_url: str, model_dir: Path, source: Path, preset: str, hq: str = "aac", device: str = "cpu"
) -> dict:
    data = tmp / f"child-{uuid.uuid4().hex[:6]}"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "REDIS_URL": redis_url,
        "STEMS_DATA_DIR": str(data),
        "STEMS_MODEL_DIR": str(model_dir),
        "STEMS_STORAGE": "local",
        "STEMS_KEY_PREFIX": f"c{uuid.uuid4().hex[:8]}",
        "STEMS_DEVICE": device,
    }
    r = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--child-split", "--source", str(source), "--preset", preset, "--hq", hq],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(data, ignore_errors=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"memory child failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# -- figures ----------------------------------------------------------------------------------
def progress_log(started: float):
    """A print with the seconds since `started`: a long benchmark shows where it is."""

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    return log


def _figure(name: str, value: float | None, goal: str, how: str, **detail) -> dict:
    """One figure with the machine it was measured on (CPU, flags, libraries, load when it was taken):
    a figure holds for that CPU, never for the project on all (issue 21)."""
    from pipelines.machine import bench_description

    return {
        "figure": name,
        "value": None if value is None else round(value, 4),
        "goal": goal,
        "how": how,
        "machine": bench_description(),
        "detail": detail,
    }


def memory_ratio(
    tmp: Path,
    redis_url: str,
    model_dir: Path,
    preset: str,
    short_s: float,
    long_s: float,
    label: str,
    hq: str,
    log,
    device: str = "cpu",
    source: str = "flac",
    name: str | None = None,
) -> dict:
    short = write_music(tmp / f"mem-{preset}-{short_s:g}.{source}", short_s, 11)
    long = write_music(tmp / f"mem-{preset}-{long_s:g}.{source}", long_s, 12)
    log(f"memory {preset}: {short_s:g} s")
    a = run_child(tmp, redis_url, model_dir, short, preset, hq, device)
    log(f"memory {preset}: {long_s:g} s")
    b = run_child(tmp, redis_url, model_dir, long, preset, hq, device)
    short.unlink()
    long.unlink()
    gpu = {}
    if "cuda_peak_mib" in a:
        gpu = {
            "cuda_peak_ratio": round(b["cuda_peak_mib"] / a["cuda_peak_mib"], 4),
            "short_cuda_peak_mib": round(a["cuda_peak_mib"], 1),
            "long_cuda_peak_mib": round(b["cuda_peak_mib"], 1),
        }
    return _figure(
        name or f"memory_ratio_60min_vs_1min[{preset}]",
        b["maxrss_mib"] / a["maxrss_mib"],
        "<= 1.3",
        f"peak RSS (ru_maxrss) of a fresh worker subprocess running run_split end to end on {label} "
        f"({preset}, 24-bit WAV + {hq} HQ, {source.upper()} source, device {a['device']})",
        short_seconds=short_s,
        long_seconds=long_s,
        short_peak_mib=round(a["maxrss_mib"], 1),
        long_peak_mib=round(b["maxrss_mib"], 1),
        short_job_s=round(a["seconds"], 1),
        long_job_s=round(b["seconds"], 1),
        **gpu,
    )


def overhead_vs_apply_model(worker: Worker, clip: Path, rounds: int, log) -> dict:
    import torch
    from demucs.apply import apply_model

    from pipelines import audio as A

    model = worker.ctx.engine.separator("htdemucs").model
    audio, _ = A.decode(clip)
    wav = torch.from_numpy(audio)
    ref = wav.mean(0)
    normalised = ((wav - ref.mean()) / (ref.std() + 1e-8))[None]

    def reference() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            apply_model(
                model, normalised, shifts=0, split=True, overlap=0.25, device="cpu", num_workers=0, progress=False
            )
        return time.perf_counter() - t0, time.process_time() - c0

    refs, ours, no_hq = [], [], []
    for k in range(rounds):
        log(f"overhead: apply_model ({k + 1}/{rounds + 2})")
        refs.append(reference())
        log(f"overhead: worker job ({k + 1}/{rounds})")
        ours.append(_timed_jobs(worker, [worker.submit(clip, "4_tracks")]))
    log(f"overhead: apply_model ({rounds + 1}/{rounds + 2})")
    refs.append(reference())
    log("overhead: worker job without HQ encodes")
    no_hq.append(_timed_jobs(worker, [worker.submit(clip, "4_tracks", hq="none")]))
    log(f"overhead: apply_model ({rounds + 2}/{rounds + 2})")
    refs.append(reference())
    best_ref = _best([r[0] for r in refs])
    return _figure(
        "overhead_vs_apply_model",
        _best([o[0] for o in ours]) / best_ref,
        "<= 1.10",
        f"wall time of run_split on a {clips_seconds([clip]):g} s clip, 4_tracks on htdemucs (download, decode, "
        "separate, 4 x 24-bit WAV + AAC, upload), warm engine, no cache / demucs apply_model alone on the same "
        f"audio and loaded model, same {torch.get_num_threads()} threads; " + BEST,
        ratio_without_hq=round(no_hq[0][0] / best_ref, 4),
        **_spread("ours", ours),
        **_spread("ours_without_hq", no_hq),
        **_spread("apply_model", refs),
    )


def vs_demucs_cli(worker: Worker, store_root: Path, clips: list[Path], tmp: Path, rounds: int, log) -> dict:
    from pipelines.families.demucs_family import signature
    from pipelines.registry import get_spec

    repo = tmp / "cli_repo"
    repo.mkdir(exist_ok=True)
    (name,) = get_spec("htdemucs").files
    shutil.copyfile(store_root / name, repo / f"{signature(name)}.th")  # see tools/reference.py: bare signature

    def cli() -> tuple[float, float]:
        out = tmp / f"cli_out_{uuid.uuid4().hex[:6]}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "demucs",
                "--repo",
                str(repo),
                "-n",
                signature(name),
                "--shifts",
                "0",
                "-d",
                "cpu",
                "-o",
                str(out),
                *map(str, clips),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            raise RuntimeError(f"demucs CLI failed: {r.stderr[-3000:]}")
        shutil.rmtree(out, ignore_errors=True)
        return seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    def ours(hq: str = "aac") -> tuple[float, float]:
        return _timed_jobs(worker, [worker.submit(c, "4_tracks", hq=hq) for c in clips])

    theirs, mine = [], []
    for k in range(rounds):
        log(f"cli: demucs command line ({k + 1}/{rounds})")
        theirs.append(cli())
        log(f"cli: warm worker ({k + 1}/{rounds})")
        mine.append(ours())
    log("cli: warm worker without HQ encodes (the CLI makes none)")
    no_hq = [ours("none")]
    best_cli = _best([t[0] for t in theirs])
    return _figure(
        "vs_demucs_cli",
        _best([m[0] for m in mine]) / best_cli,
        "well under 1",
        f"{len(clips)} clips of {clips_seconds(clips):g} s, 4_tracks through the warm in-process worker "
        "(24-bit WAV + AAC each, no cache) / `python -m demucs --repo DIR -n 955717e8 --shifts 0 -d cpu` "
        "on the same files (one command; 16-bit WAV out; its startup and model load included); " + BEST,
        ratio_without_hq=round(no_hq[0][0] / best_cli, 4),
        **_spread("ours", mine),
        **_spread("ours_without_hq", no_hq),
        **_spread("cli", theirs),
    )


def _cold_run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}): {err[-3000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def cold_split_vs_demucs_cli(full: Path, torch_store: Path, clip: Path, tmp: Path, rounds: int, log) -> dict:
    """`stems split` in a fresh process against the demucs CLI on the same WAV clip and weights, WAV out both sides."""
    import soundfile as sf

    from pipelines.families.demucs_family import signature
    from pipelines.registry import get_spec

    repo = tmp / "cold_cli_repo"
    repo.mkdir(exist_ok=True)
    (name,) = get_spec("htdemucs").files
    shutil.copyfile(full / name, repo / f"{signature(name)}.th")

    def cli(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "demucs",
            "--repo",
            str(repo),
            "-n",
            signature(name),
            "--shifts",
            "0",
            "-d",
            "cpu",
            "-o",
            str(out),
            *extra,
            str(clip),
        ]

    def ours(store: Path, out: Path, bits: int = 16) -> list[str]:
        return [
            sys.executable,
            "-m",
            "stems.cli",
            "split",
            str(clip),
            "--preset",
            "4_tracks",
            "--out",
            str(out),
            "--model-dir",
            str(store),
            "--bit-depth",
            str(bits),
            "--hq",
            "none",
        ]

    runs: dict[str, list] = {"cli": [], "ours": [], "ours_torch": []}
    for k in range(rounds):  # interleaved: a drift of the shared machine's speed hits every side alike
        for side, cmd in (
            ("cli", cli(tmp / "cold_cli")),
            ("ours", ours(full, tmp / "cold_ours")),
            ("ours_torch", ours(torch_store, tmp / "cold_torch")),
        ):
            log(f"cold split: {side} ({k + 1}/{rounds})")
            runs[side].append(_cold_run(cmd))
    log("cold split: float32 stems of both, for their difference")
    _cold_run(cli(tmp / "cold_cli_f32", "--float32", "--clip-mode", "none"))
    _cold_run(ours(full, tmp / "cold_ours_f32", 32))
    cli_dir = next((tmp / "cold_cli_f32").glob(f"{signature(name)}/*"))
    difference = max(
        float(
            np.abs(
                sf.read(str(cli_dir / f"{s}.wav"), dtype="float32")[0]
                - sf.read(str(tmp / "cold_ours_f32" / f"{s}.wav"), dtype="float32")[0]
            ).max()
        )
        for s in get_spec("htdemucs").sources
    )
    pairs = [o[0] / c[0] for o, c in zip(runs["ours"], runs["cli"])]
    torch_pairs = [o[0] / c[0] for o, c in zip(runs["ours_torch"], runs["cli"])]
    return _figure(
        "cold_split_vs_demucs_cli",
        float(np.median(pairs)),
        "<= 0.6",
        f"wall time of `stems split CLIP --preset 4_tracks --bit-depth 16 --hq none` (a fresh process: "
        f"imports, model and ONNX Runtime load, separation, 4 x 16-bit WAV) / `python -m demucs --repo DIR "
        f"-n 955717e8 --shifts 0 -d cpu -o OUT CLIP` (16-bit WAV, its default) on one {clips_seconds([clip]):g} s "
        "WAV clip and the same full-size random htdemucs; median of the ratios of interleaved pairs; "
        "ours_torch: the same command with params.backend torch (the path before ONNX Runtime)",
        ratio_pairs=[round(r, 4) for r in pairs],
        ratio_torch_backend=round(float(np.median(torch_pairs)), 4),
        ratio_torch_backend_pairs=[round(r, 4) for r in torch_pairs],
        stems_max_abs_difference=difference,
        stems_difference_how="float32 WAVs of both (demucs --float32 --clip-mode none; stems --bit-depth 32)",
        **{
            f"{side}_{what}": [round(r[i], 2) for r in rs]
            for side, rs in runs.items()
            for i, what in enumerate(("s", "cpu_s", "peak_mib"))
        },
    )


def bfloat16_on_cpu(torch_store: Path, clip: Path, rounds: int, log) -> dict:
    """`params.precision` bfloat16 against float32 on this CPU (issue 21, item 3): the time of one separation of the
    clip by the full-size htdemucs on torch, interleaved, and how far the bfloat16 stems are from the float32 ones
    (dB, the worst stem). Off by default unless both the speed and the agreement (60 dB: the same stems within
    1e-3) win, so the figure says whether this CPU would change that."""
    import torch

    from bench.quality import sdr
    from pipelines import audio as A
    from pipelines.modelstore import ModelStore
    from pipelines.registry import get_spec

    store, spec = ModelStore(torch_store), get_spec("htdemucs")
    files, (audio, sr) = store.resolve(spec), A.decode(clip)
    seps = {}
    for precision in ("float32", "bfloat16"):
        seps[precision] = spec.separator_class()(spec, files, {**store.params_for(spec), "precision": precision})
        seps[precision].setup("cpu")

    def run(precision: str) -> tuple[float, dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        out = seps[precision].separate(audio, sr)
        return time.perf_counter() - t0, out

    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    outs: dict[str, dict[str, np.ndarray]] = {}
    for k in range(rounds):  # interleaved pairs: a drift of the shared machine's speed hits both alike
        for precision in times:
            log(f"bfloat16: {precision} ({k + 1}/{rounds})")
            seconds, outs[precision] = run(precision)
            times[precision].append(seconds)
    worst = min(sdr(ref, outs["bfloat16"][name]) for name, ref in outs["float32"].items())
    ratios = [b / f for f, b in zip(times["float32"], times["bfloat16"])]
    return _figure(
        "bfloat16_vs_float32_cpu",
        float(np.median(ratios)),
        "< 1.0 at >= 60 dB to turn it on by default",
        f"separation of a {clips_seconds([clip]):g} s clip by the full-size random htdemucs on torch, precision "
        f"bfloat16 / float32, median of {rounds} interleaved pairs, {torch.get_num_threads()} threads",
        agreement_db_worst_stem=round(float(worst), 1),
        ratios=[round(r, 4) for r in ratios],
        seconds=times,
    )


def clips_seconds(clips: list[Path]) -> float:
    import soundfile as sf

    return round(sf.info(str(clips[0])).duration, 2)


def selection_cost(worker: Worker, track: Path, preset: str, log, label: str) -> dict:
    sel, whole = [], []
    log(f"selection {preset}: 10 s selection")
    sel.append(_timed_jobs(worker, [worker.submit(track, preset, (140.0, 150.0))]))
    log(f"selection {preset}: whole track")
    whole.append(_timed_jobs(worker, [worker.submit(track, preset)]))
    log(f"selection {preset}: 10 s selection")
    sel.append(_timed_jobs(worker, [worker.submit(track, preset, (200.0, 210.0))]))
    return _figure(
        f"selection_cost_ratio[{preset}]",
        _best([x[0] for x in sel]) / whole[0][0],
        "close to 10/300 = 0.033",
        f"wall time of run_split on a 10 s selection of a 5-minute track / on the whole track ({label}; warm, "
        "no cache; selections at 140 s and 200 s, before and after the whole run, the faster one)",
        **_spread("selection", sel),
        **_spread("whole", whole),
    )


def shared_work(tmp: Path, redis_url: str, model_dir: Path, clip: Path, warm_engine, rounds: int, log) -> dict:
    presets = ("2_tracks", "acapella", "instrumental", "4_tracks")
    alone, together, hits = [], [], []
    steps = ["alone", "together"] * rounds + ["alone"]
    for k, step in enumerate(steps):
        w = Worker(tmp / f"shared-{k}", redis_url, model_dir, cache=True)
        w.ctx.engine._warm = warm_engine._warm  # the same warm model: this measures work, not loading
        log(f"shared work: {step}")
        if step == "alone":
            alone.append(_timed_jobs(w, [w.submit(clip, "4_tracks")]))
        else:
            together.append(_timed_jobs(w, [w.submit(clip, p) for p in presets]))
            hits.append((w.ctx.engine.cache.hits, w.ctx.engine.cache.file_hits))
    return _figure(
        "shared_work_ratio",
        _best([t[0] for t in together]) / _best([a[0] for a in alone]),
        "close to 1",
        f"run_split of {', '.join(presets)} on one {clips_seconds([clip]):g} s clip with a fresh step cache "
        "/ 4_tracks alone with a fresh cache (warm htdemucs; separation and encoded stems cached); " + BEST,
        **_spread("together", together),
        **_spread("alone", alone),
        step_and_file_cache_hits=hits,
    )


def _timed_jobs(worker: Worker, job_ids: list[str]) -> tuple[float, float]:
    jobs = [worker.split(j) for j in job_ids]
    return sum(j["seconds"] for j in jobs), sum(j["cpu_seconds"] for j in jobs)


BEST = (
    "the fastest of interleaved repetitions of each side (the machine is shared: the minimum is the run least "
    "disturbed by neighbours); all runs and CPU times in detail"
)


def _best(xs: list[float]) -> float:
    return min(xs)


def _spread(name: str, runs: list[tuple[float, float]]) -> dict:
    return {f"{name}_s": [round(r[0], 2) for r in runs], f"{name}_cpu_s": [round(r[1], 2) for r in runs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short inputs: a smoke run, not the figures")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--only",
        action="append",
        choices=("cold", "memory_hour", "warm"),
        help="run only these figures and merge them into --out (repeatable)",
    )
    ap.add_argument("--child-split", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--hq", default="aac", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_split:
        return child_split(args)

    import torch

    from pipelines.machine import bench_description
    from pipelines.modelstore import ModelStore
    from stems.redisboot import start_redis
    from tools.random_models import install_random_demucs

    started = time.perf_counter()
    log = progress_log(started)
    q = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="stems-bench-perf-"))
    redis, url = start_redis(tmp / "redis")
    figures: list[dict] = []
    machine = {
        **bench_description(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        # the ONNX Runtime files are built at install, as `stems models install` does, so no figure pays
        # for them; in a child process: on Linux a child's ru_maxrss starts from its parent's RSS at
        # fork, so this process must never hold a model, or every memory figure would read its size
        log("installing the random htdemucs stand-ins (and their ONNX Runtime files)")
        full = ModelStore(tmp / "models-full")
        install_random_demucs(full, "htdemucs", size="full", share_derived=False)
        prepare_in_child(full.root, "htdemucs")
        small = ModelStore(tmp / "models-small")
        install_random_demucs(small, "htdemucs", size="small", share_derived=False)
        prepare_in_child(small.root, "htdemucs")
        dsp_ok = _dsp_available()
        only = set(args.only or [])

        def wanted(group: str) -> bool:
            return not only or group in only

        if wanted("cold"):
            torch_store = ModelStore(tmp / "models-full-torch")
            install_random_demucs(
                torch_store, "htdemucs", size="full", params={"backend": "torch"}, share_derived=False
            )
            clip = write_music(tmp / "cold30.wav", 30.0 if not q else 8.0, 60)
            figures.append(cold_split_vs_demucs_cli(full.root, torch_store.root, clip, tmp, 3 if not q else 1, log))
            figures.append(bfloat16_on_cpu(torch_store.root, clip, 5 if not q else 1, log))
        if wanted("memory_hour"):
            narrow = ModelStore(tmp / "models-narrow")
            install_random_demucs(narrow, "htdemucs", size="narrow", share_derived=False)
            prepare_in_child(narrow.root, "htdemucs")
            figures.append(
                memory_ratio(
                    tmp,
                    url,
                    narrow.root,
                    "4_tracks",
                    60.0 if not q else 10.0,
                    3600.0 if not q else 40.0,
                    "a 60-minute vs a 1-minute stereo track with a narrow htdemucs (the released architecture: depth, "
                    "7.8 s segments, 5 transformer layers; 8 channels instead of 48, transformer width 64 instead of "
                    "512: the full size would take hours here; HQ as FLAC, as for phantom_center)",
                    "flac",
                    log,
                )
            )
        if "warm" in only:  # the warm worker against the demucs CLI (figure 3 below), on its own
            worker = Worker(tmp / "warm", url, full.root, cache=False)
            worker.split(worker.submit(write_music(tmp / "warm.flac", 3.0, 20), "4_tracks"))
            clips = [write_music(tmp / f"cli{k}.wav", 5.5, 30 + k) for k in range(5 if not q else 2)]
            figures.append(vs_demucs_cli(worker, full.root, clips, tmp, 2 if not q else 1, log))
        if only:
            raise _Done

        # 1. memory: a fresh worker process per split
        if dsp_ok:
            figures.append(
                memory_ratio(
                    tmp,
                    url,
                    full.root,
                    "phantom_center",
                    60.0 if not q else 10.0,
                    3600.0 if not q else 40.0,
                    "a 60-minute vs a 1-minute stereo track "
                    "(HQ as FLAC: AAC of two hour-long stems alone takes ~8 min here; both go "
                    "through the same streaming encoder)",
                    "flac",
                    log,
                )
            )
        else:
            figures.append(
                _figure(
                    "memory_ratio_60min_vs_1min[phantom_center]",
                    None,
                    "<= 1.3",
                    "not measured: pipelines/families/dsp.py is not importable",
                )
            )
        figures.append(
            memory_ratio(
                tmp,
                url,
                full.root,
                "4_tracks",
                30.0 if not q else 4.0,
                120.0 if not q else 12.0,
                "a 120 s vs a 30 s stereo track with the full-size htdemucs (4x the length, both at "
                "least one 30 s engine block; not 60 min vs 1 min: an hour of it takes hours on "
                "this CPU)",
                "aac",
                log,
                name="memory_ratio_120s_vs_30s[4_tracks, full size]",
            )
        )

        # a warm worker (the full htdemucs) for the timing figures
        worker = Worker(tmp / "warm", url, full.root, cache=False)
        clip30 = write_music(tmp / "clip30.flac", 30.0 if not q else 6.0, 21)
        log("first job (loads htdemucs)")
        worker.split(worker.submit(write_music(tmp / "warm.flac", 3.0, 20), "4_tracks"))

        # 2. overhead of the whole job over apply_model alone
        figures.append(overhead_vs_apply_model(worker, clip30, 2 if not q else 1, log))

        # 3. against the demucs command line
        clips = [write_music(tmp / f"cli{k}.wav", 5.5, 30 + k) for k in range(5 if not q else 2)]
        figures.append(vs_demucs_cli(worker, full.root, clips, tmp, 2 if not q else 1, log))

        # 4. a selection costs its share of the track
        track = write_music(tmp / "track5min.flac", 300.0, 40)
        if dsp_ok:  # the cut happens at decode, before any model: the cheapest preset shows it best
            dsp_worker = Worker(tmp / "dsp", url, full.root, cache=False)
            figures.append(selection_cost(dsp_worker, track, "phantom_center", log, "phantom_center, dsp.centre"))
        else:
            small_worker = Worker(tmp / "small", url, small.root, cache=False)
            small_worker.split(small_worker.submit(clips[0], "4_tracks"))  # warm
            figures.append(
                selection_cost(
                    small_worker,
                    track,
                    "4_tracks",
                    log,
                    "4_tracks on a small random htdemucs: same code path, a fraction of the compute",
                )
            )

        # 5. presets that share htdemucs run it once
        clip10 = write_music(tmp / "clip10.flac", 10.0 if not q else 5.5, 50)
        figures.append(shared_work(tmp, url, full.root, clip10, worker.ctx.engine, 2 if not q else 1, log))

        # 6. model loading in the warm worker's jobs after its first
        figures.append(warm_load_fraction(worker))
    except _Done:
        pass
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    command = "python -m bench.perf" + (" --quick" if q else "") + "".join(f" --only {o}" for o in args.only or [])
    doc = {
        "machine": machine,
        "quick": q,
        "total_seconds": round(time.perf_counter() - started, 1),
        "command": command,
        "figures": figures,
    }
    if args.only and args.out.exists():  # a partial run replaces its own figures and keeps the others
        kept = json.loads(args.out.read_text())
        names = {f["figure"] for f in figures}
        doc["figures"] = [f for f in kept["figures"] if f["figure"] not in names] + figures
        doc["partial_runs"] = kept.get("partial_runs", []) + [
            {"command": command, "machine": machine, "total_seconds": doc["total_seconds"]}
        ]
        doc["machine"], doc["command"], doc["total_seconds"] = kept["machine"], kept["command"], kept["total_seconds"]
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    return 0


def warm_load_fraction(worker: Worker) -> dict:
    first, warm = worker.jobs[0], worker.jobs[1:]
    total = sum(j["seconds"] for j in warm)
    loading = sum(j["load_seconds"] for j in warm)
    return _figure(
        "warm_load_fraction",
        loading / total if total else None,
        "< 0.02",
        f"model-loading seconds / job seconds over the {len(warm)} jobs after the first in one warm worker "
        "(Engine.load_seconds read around each run_split)",
        first_job_load_fraction=round(first["load_seconds"] / first["seconds"], 4),
        first_job_s=round(first["seconds"], 2),
        first_job_load_s=round(first["load_seconds"], 2),
        warm_jobs=len(warm),
        warm_jobs_s=round(total, 2),
        warm_load_s=round(loading, 4),
    )


class _Done(Exception):
    """A --only run has its figures."""


def _dsp_available() -> bool:
    try:
        from pipelines.registry import get_spec

        get_spec("dsp.centre").separator_class()
        return True
    except Exception:
        return False


def print_table(doc: dict) -> None:
    m = doc["machine"]
    print(
        f"\nstems performance on {m.get('cpu', m.get('processor'))} [{' '.join(m.get('flags', []))}] "
        f"({m['cpu_count']} CPUs, torch threads {m['torch_threads']}, {m['platform']}; "
        f"load average {m['loadavg_start']} -> {m['loadavg_end']}; {doc['total_seconds']:.0f} s)"
    )
    rows = []
    for f in doc["figures"]:
        how = f["how"]
        if "ratio_without_hq" in f["detail"]:
            how += f" [same without HQ encodes: {f['detail']['ratio_without_hq']:.3f}]"
        if "agreement_db_worst_stem" in f["detail"]:
            how += f" [{f['detail']['agreement_db_worst_stem']} dB from float32, worst stem]"
        rows.append((f["figure"], "-" if f["value"] is None else f"{f['value']:.3f}", f["goal"], how))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    print(f"{'figure':<{w0}}  {'value':>{w1}}  {'goal':<{w2}}  how measured")
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:<{w2}}  {r[3]}")


if __name__ == "__main__":
    sys.exit(main())
