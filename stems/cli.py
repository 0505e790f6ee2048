"""`stems`: the command line: keys, models, presets, local and remote splits, workers, and the dev stack."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from pipelines.modelstore import ModelStore

    from .jobstore import IssuedKey, JobStore
    from .settings import Settings


def _settings() -> Settings:
    from .settings import get_settings

    return get_settings()


def _model_store(args: argparse.Namespace) -> ModelStore:
    from pipelines.modelstore import ModelStore

    return ModelStore(args.model_dir or _settings().model_dir)


def _store() -> JobStore:
    from .container import Container

    return Container(_settings()).store


def _print_issued(issued: IssuedKey, as_json: bool) -> None:
    fields = {k: v for k, v in issued.model_dump().items() if v is not None}
    if as_json:
        print(json.dumps(fields))
        return
    for name, value in fields.items():
        print(f"{name:15} {value}")
    print("the api_key and webhook_secret are shown only now: store them", file=sys.stderr)


def cmd_keys_create(args: argparse.Namespace) -> int:
    try:
        issued = _store().issue_key(args.user)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_issued(issued, args.json)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    import datetime

    rows = [
        k.model_dump(exclude={"webhook_secret"}) | {"own_webhook_secret": k.webhook_secret is not None}
        for k in _store().list_keys()
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        made = (
            datetime.datetime.fromtimestamp(r["created_at"]).isoformat(timespec="seconds") if r["created_at"] else "-"
        )
        print(
            f"{r['key_id']:22} {r['user_id']:24} {made:20} {'' if r['own_webhook_secret'] else 'no secret of its own: stems keys rotate'}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    if not _store().revoke_key(args.key_id):
        print(f"error: no key {args.key_id!r} (see `stems keys list`)", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}: it answers 401 from now on")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    issued = _store().rotate_webhook_secret(args.key_id)
    if issued is None:
        print(f"error: no key {args.key_id!r} (see `stems keys list`)", file=sys.stderr)
        return 1
    _print_issued(issued, args.json)
    return 0


def cmd_keys_grant(args: argparse.Namespace) -> int:
    from .ingest import clean_key, mint_grant

    s = _settings()
    if clean_key(args.key) is None:
        print(f"error: {args.key!r} is not an object key", file=sys.stderr)
        return 2
    ttl = min(args.ttl, s.grant_max_ttl_s)
    print(mint_grant(s.secret_key, args.user, args.key.lstrip("/"), ttl))
    if ttl < args.ttl:
        print(f"(valid for {ttl} s: STEMS_GRANT_MAX_TTL_S)", file=sys.stderr)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from pipelines.families import backend_choice
    from pipelines.machine import this_machine
    from pipelines.registry import load_registry

    store = _model_store(args)
    machine = this_machine()
    rows = []
    for model_id, reason in store.installed().items():
        spec = load_registry()[model_id]
        files = dict(sorted(((store.entry(model_id) or {}).get("files") or {}).items()))
        # this CPU's figures, for the weights installed now (what `auto` follows; `stems models bench` re-measures)
        record = backend_choice.load(backend_choice.path_for(store.root, model_id, machine))
        record = record if record is not None and (record.machine, record.files) == (machine, files) else None
        rows.append((model_id, spec.family, spec.queue, "yes" if reason is None else "no", reason or "", record))
    if args.json:
        print(
            json.dumps(
                [
                    dict(zip(("id", "family", "queue", "installed", "reason"), r[:5]))
                    | {
                        "backend": r[5]
                        and r[5].model_dump(
                            mode="json", include={"choice", "seconds", "rounds", "loadavg", "measured_at"}
                        )
                    }
                    for r in rows
                ],
                indent=1,
            )
        )
    else:
        for r in rows:
            print(f"{r[0]:22} {r[1]:10} {r[2]:11} {r[3]:4} {r[4]}" + (f"  [{r[5].summary()}]" if r[5] else ""))
    return 0


def cmd_models_bench(args: argparse.Namespace) -> int:
    """Time each backend that can run the model on this CPU again and keep the choice `auto` follows."""
    from pipelines.engine import Engine
    from pipelines.errors import StemsError
    from pipelines.families import backend_choice
    from pipelines.machine import this_machine
    from pipelines.registry import get_spec

    store = _model_store(args)
    try:
        spec = get_spec(args.model_id)
        if not getattr(spec.separator_class(), "derives_files", False):
            print(
                f"error: {args.model_id} has one backend (torch or its own library): nothing to choose", file=sys.stderr
            )
            return 2
        machine = this_machine()
        backend_choice.forget(store.root, args.model_id, machine)
        sep = Engine(store, device="cpu").separator(args.model_id)
    except StemsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = getattr(sep, "backend_record", None)
    if record is None:  # params.backend is explicit, or the model cannot run on ONNX Runtime here
        backend, reason = getattr(sep, "backend", None), getattr(sep, "backend_reason", None)
        print(f"{args.model_id} runs on {backend}, not measured: {reason or 'params.backend'}")
        return 0
    print(f"{args.model_id} on {machine.describe()}: {record.summary()}")
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    problems = {k: v for k, v in _model_store(args).verify().items() if v}
    for model_id, problem in _model_store(args).verify().items():
        print(f"{model_id:22} {'ok' if not problem else problem}")
    return 1 if problems else 0


def cmd_models_install(args: argparse.Namespace) -> int:
    from pipelines.errors import StemsError

    store = _model_store(args)
    try:
        entry = store.install(
            args.model_id, [Path(p) for p in args.files], json.loads(args.params) if args.params else None
        )
        print(json.dumps({args.model_id: entry}, indent=1))
        if not args.no_prepare:
            _prepare(store, args.model_id)
    except StemsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipelines.errors import StemsError
    from pipelines.registry import get_spec, load_registry

    from .modelpull import pull_all
    from .settings import Settings

    if args.all == bool(args.model_ids):
        print("error: name the model ids to pull, or --all", file=sys.stderr)
        return 2
    try:
        settings = Settings(model_mirror=args.mirror) if args.mirror else _settings()
        specs = (
            [s for s in load_registry().values() if s.weights == "store"]
            if args.all
            else [get_spec(m) for m in dict.fromkeys(args.model_ids)]
        )
    except (StemsError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outcomes = pull_all(specs, _model_store(args), settings, settings.model_mirror)
    for o in outcomes:
        print(f"{o.model_id}: {o.status.replace('_', ' ')}: {o.message}", file=sys.stdout if o.ok else sys.stderr)
    # --all reports the gated models and goes on; naming one that cannot be pulled is a failure
    return 1 if any(o.status == "failed" or (o.status == "gated" and not args.all) for o in outcomes) else 0


def _prepare(store: ModelStore, model_id: str) -> None:
    """Load a model whose family derives files from its weights (demucs's ONNX Runtime graphs) once, as a
    worker will: they are built into the store now rather than on the first job."""
    from pipelines.engine import Engine
    from pipelines.registry import get_spec

    spec = get_spec(model_id)
    if reason := store.missing(spec):  # e.g. its package is not installed on this machine
        print(f"not loaded here ({reason}); it is prepared on first use", file=sys.stderr)
        return
    if not spec.separator_class().derives_files:
        return
    sep = Engine(store, device="cpu").separator(model_id)
    backend = getattr(sep, "backend", None)
    if backend is not None:
        record = getattr(sep, "backend_record", None)
        why = record.summary() if record is not None else getattr(sep, "backend_reason", "")
        print(f"{model_id} loads and runs on {backend}" + (f" ({why})" if why else ""), file=sys.stderr)


def cmd_presets(args: argparse.Namespace) -> int:
    from pipelines.errors import PresetError
    from pipelines.install_hint import hint_command, preset_hint
    from pipelines.licences import install_gaps, refused_models, unservable
    from pipelines.presets import load_catalogue
    from pipelines.registry import get_spec

    store, use = _model_store(args), _settings().declared_use
    print(f"declared use: {use} (STEMS_DECLARED_USE)")
    for p in load_catalogue().presets:
        hint = None
        skipped = refused_models([m for c in p.chains for m in c.model_ids], use)
        try:
            _, chain = p.pick_chain(unservable(store.missing, use))
            dsp = all(get_spec(m).family == "dsp" for m in chain.model_ids)
            status = "served by  " + "+".join(chain.model_ids) + ("  (DSP fallback: no trained model)" if dsp else "")
        except PresetError as exc:
            missing = [m for m in cast(list[str], exc.fields["missing_models"]) if m not in skipped]
            status = (
                "missing    " + ", ".join(missing) if missing else f"refused    no chain's licence allows {use} use"
            )
            hint = preset_hint(install_gaps(p.chains, store.missing, use))
        print(f"{p.name:24} {status}\n{'':24} -> {', '.join(p.output_stems())}")
        if hint:
            print(f"{'':24} to install: {hint if args.details else hint_command(hint)}")
        if skipped:
            print(f"{'':24} skipped, licence does not allow {use} use: {', '.join(skipped)}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from .localsplit import run

    return run(args, _model_store(args), _settings())


def cmd_remote_split(args: argparse.Namespace) -> int:
    """Split files on a stems server through the Python client; prints `path<TAB>made_by` per stem."""
    from tqdm import tqdm

    from api.schemas import BatchItemError, SplitStatus, StemsEstimate, StemsQueued
    from pipelines.errors import StemsError
    from pipelines.jobspec import Selection

    from .client import ApiError, Client, JobFailed
    from .localsplit import time_range

    if not args.key:
        print("error: no API key: pass --key or set STEMS_API_KEY", file=sys.stderr)
        return 2
    try:
        chosen = time_range(args.selection, "--selection", Selection) if args.selection else None
    except StemsError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    out = Path(args.out)
    jobs: list[StemsQueued] = []
    with Client(args.server, args.key) as client:
        try:
            # the key and the preset are checked before a long upload, not after it
            known = {p.name: p for p in client.presets().presets}
            preset = known.get(args.preset)
            if preset is not None and not preset.available:
                print(
                    f"error: preset {args.preset!r} is not available on {args.server}: no worker holds "
                    f"{', '.join(preset.missing_models)} (stems models install on a worker)",
                    file=sys.stderr,
                )
                return 2
            bodies: list[dict[str, Any]] = []
            for file in args.files:
                with tqdm(
                    total=Path(file).stat().st_size,
                    unit="B",
                    unit_scale=True,
                    desc=f"upload {Path(file).name}",
                    file=sys.stderr,
                ) as bar:
                    audio = client.upload(file, progress=lambda sent, _: bar.update(sent - bar.n))
                duration = client.wait_audio(audio.audio_id).duration
                selection = {"start": chosen.start, "end": chosen.end or duration} if chosen else None
                bodies.append(
                    {
                        "preset": args.preset,
                        "audio_id": audio.audio_id,
                        "bit_depth": args.bit_depth,
                        "hq_streaming_format": args.hq,
                        "selection": selection,
                    }
                )
            answers: list[StemsQueued | StemsEstimate | BatchItemError]
            if len(bodies) == 1:
                answers = [client.create_stems(**bodies[0])]
            else:  # one call queues them all, each checked as if sent alone
                answers = client.create_stems_batch(bodies)
                refused = [(f, j) for f, j in zip(args.files, answers) if isinstance(j, BatchItemError)]
                for file, j in refused:
                    print(f"error: {file}: {j.detail} ({j.code})", file=sys.stderr)
                if refused:
                    for answer in answers:
                        if isinstance(answer, StemsQueued):
                            client.cancel(answer.creation_id)
                    return 2
            jobs = [j for j in answers if isinstance(j, StemsQueued)]  # no dry runs here
            for file, job in zip(args.files, jobs):
                dest = out if len(jobs) == 1 else out / Path(file).stem
                with tqdm(total=100, unit="%", desc=f"{args.preset} {Path(file).name}", file=sys.stderr) as bar:

                    def progress(status: SplitStatus) -> None:
                        bar.set_postfix_str(status.stage)
                        bar.update(int(status.progress * 100) - bar.n)

                    done = client.wait(job.creation_id, progress=progress)
                for stem in done.stems:
                    ext = "wav" if args.format == "wav" else _hq_extension(stem.hq_format)
                    path = client.download_stem(stem.stem_id, dest / f"{stem.name}.{ext}", format=args.format)
                    print(f"{path}\t{stem.made_by}")
        except (ApiError, JobFailed, OSError) as exc:
            return _remote_failed(exc)
        except KeyboardInterrupt:  # splits nobody waits for are cancelled, not left running
            for job in jobs:
                if getattr(job, "creation_id", None):
                    client.cancel(job.creation_id)
                    print(f"cancelled {job.creation_id}", file=sys.stderr)
            return 130
    return 0


def cmd_master(args: argparse.Namespace) -> int:
    """Master a file locally (no server); prints what the source and the result measure."""
    from pipelines.errors import StemsError
    from pipelines.mastering import master_file

    out = Path(args.out or Path(args.file).with_suffix("").name + f".{args.preset}.wav")
    try:
        report, _ = master_file(Path(args.file), out, args.preset, args.bit_depth)
    except StemsError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    src, res = report.source, report.result
    print(f"{out}\t{res.integrated_lufs:.2f} LUFS\t{res.true_peak_dbtp:.2f} dBTP\tLRA {res.loudness_range_lu:.2f} LU")
    print(
        f"source {src.integrated_lufs:.2f} LUFS {src.true_peak_dbtp:.2f} dBTP; gain {report.gain_db} dB, "
        f"shelves {report.low_shelf_db}/{report.high_shelf_db} dB, {report.renders} render(s)",
        file=sys.stderr,
    )
    return 0


def cmd_remote_master(args: argparse.Namespace) -> int:
    """Master a file on a stems server; downloads the WAV and prints what it measures."""
    from .client import ApiError, Client, JobFailed

    if not args.key:
        print("error: no API key: pass --key or set STEMS_API_KEY", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.file).with_suffix("").name + f".{args.preset}.wav")
    with Client(args.server, args.key) as client:
        try:
            audio = client.upload(args.file)
            client.wait_audio(audio.audio_id)
            queued = client.master_audio(audio_id=audio.audio_id, preset=args.preset, bit_depth=args.bit_depth)
            done = client.wait_mastered(queued.mastered_id)
            client.download_mastered(done.mastered_id, out)
        except (ApiError, JobFailed, OSError) as exc:
            return _remote_failed(exc)
    m = done.measured
    assert m is not None  # a complete mastering reports its measurement
    print(
        f"{out}\t{m.integrated_lufs:.2f} LUFS\t{m.true_peak_dbtp:.2f} dBTP\tLRA {m.loudness_range_lu:.2f} LU\t"
        f"{done.mastered_id}"
    )
    return 0


def _remote_failed(exc: Exception) -> int:
    """Say why a remote command stopped (the API's message and code, or the file system's); exit status 2."""
    print(
        f"error: {exc.message} ({exc.code})" if hasattr(exc, "code") and hasattr(exc, "message") else f"error: {exc}",
        file=sys.stderr,
    )
    return 2


def _master_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument(
        "--preset",
        choices=("streaming", "loud", "podcast"),
        default="streaming",
        help="streaming: -14 LUFS / -1 dBTP; loud: -9 / -1; podcast: -16 / -1.5",
    )
    p.add_argument("--out", help="the WAV to write (default: FILE's name + .PRESET.wav, here)")
    p.add_argument("--bit-depth", type=int, choices=(16, 24, 32), default=24)


def _hq_extension(fmt: str | None) -> str:
    from pipelines.audio import hq_extension

    if not fmt:
        raise OSError("the split has no HQ encode (it was made with hq_streaming_format none)")
    return hq_extension(fmt)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.celery_app import app, broker_queue

    s = _settings()
    queues = ",".join(broker_queue(q.strip(), s) for q in (args.queues or s.worker_queues).split(",") if q.strip())
    argv = ["worker", "-Q", queues, "-c", str(args.concurrency), "-O", "fair", "--loglevel", args.loglevel, "-E"]
    if args.hostname:
        argv += ["-n", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from pydantic import AliasChoices

    from .settings import Settings

    print("| variable | default | meaning |\n|---|---|---|")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if isinstance(alias, AliasChoices) else alias if isinstance(alias, str) else name.upper()
        default = field.get_default(call_default_factory=True)
        print(f"| `{env}` | `{default if default not in (None, '') else ''}` | {field.description or ''} |")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from . import stack

    if args.action == "demo":
        return stack.demo(args.file, args.preset, args.selection)
    return {"up": stack.up, "down": stack.down}[args.action]()


def main(argv: list[str] | None = None) -> int:
    from pipelines.jobspec import SAM_MODELS, STEREO_MODES

    ap = argparse.ArgumentParser(prog="stems", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    kc = keys.add_parser("create", help="a new API key for a user (stored hashed) and its webhook secret, shown once")
    kc.add_argument("--user", required=True)
    kc.add_argument("--json", action="store_true")
    kc.set_defaults(fn=cmd_keys_create)
    kl = keys.add_parser("list", help="every key: id, user, creation time (never the key or its secret)")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(fn=cmd_keys_list)
    kr = keys.add_parser("revoke", help="delete a key: 401 from then on, no more webhooks for its jobs")
    kr.add_argument("key_id")
    kr.set_defaults(fn=cmd_keys_revoke)
    ko = keys.add_parser("rotate", help="a new webhook secret for a key, shown once (the old one stops signing)")
    ko.add_argument("key_id")
    ko.add_argument("--json", action="store_true")
    ko.set_defaults(fn=cmd_keys_rotate)
    kg = keys.add_parser(
        "grant",
        help="a signed grant letting a user register one stored object (or a prefix "
        "ending in /) with POST /from-storage",
    )
    kg.add_argument("--user", required=True)
    kg.add_argument("--key", required=True, help="object key (relative to S3_PREFIX), or a prefix ending in /")
    kg.add_argument("--ttl", type=int, default=3600, help="seconds the grant is valid (default 3600)")
    kg.set_defaults(fn=cmd_keys_grant)

    models = sub.add_parser("models", help="the model store").add_subparsers(dest="action", required=True)
    for name, fn, help_ in (
        ("list", cmd_models_list, "every model id and whether it is installed"),
        ("verify", cmd_models_verify, "check the sha256 of every installed file"),
    ):
        p = models.add_parser(name, help=help_)
        p.add_argument("--model-dir")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=fn)
    mb = models.add_parser(
        "bench",
        help="time the backends that can run a model on this CPU again and keep the faster for params.backend auto",
    )
    mb.add_argument("model_id")
    mb.add_argument("--model-dir")
    mb.set_defaults(fn=cmd_models_bench)
    mi = models.add_parser("install", help="copy weight files into the store and pin their sha256")
    mi.add_argument("model_id")
    mi.add_argument("files", nargs="+")
    mi.add_argument("--params", help="JSON object of family parameters overriding the registry's")
    mi.add_argument("--model-dir")
    mi.add_argument(
        "--no-prepare",
        action="store_true",
        help="do not load the model now (its derived files are then built on first use)",
    )
    mi.set_defaults(fn=cmd_models_install)
    mp = models.add_parser("pull", help="download models from their publishers (or STEMS_MODEL_MIRROR), check, install")
    mp.add_argument("model_ids", nargs="*", metavar="ID")
    mp.add_argument("--all", action="store_true", help="every model whose weights can be pulled; report the gated ones")
    mp.add_argument(
        "--mirror", help="fetch from this https base URL or s3://bucket/prefix (default: STEMS_MODEL_MIRROR)"
    )
    mp.add_argument("--model-dir")
    mp.set_defaults(fn=cmd_models_pull)

    pr = sub.add_parser("presets", help="the catalogue with availability")
    pr.add_argument("--model-dir")
    pr.add_argument("--details", action="store_true", help="the whole install hint, not only its command")
    pr.set_defaults(fn=cmd_presets)

    sp = sub.add_parser("split", help="split a file locally, no server (the worker's own streaming path)")
    sp.add_argument("file")
    sp.add_argument("--preset", required=True)
    sp.add_argument("--out", required=True, help="directory for the stems")
    sp.add_argument("--selection", help="START:END in seconds: split only this part")
    sp.add_argument("--bit-depth", type=int, choices=(16, 24, 32), default=24, help="WAV bit depth (32 = float)")
    sp.add_argument(
        "--hq",
        choices=("aac", "mp3", "opus", "flac", "none"),
        default="none",
        help="also write each stem in this format",
    )
    sp.add_argument(
        "--chain",
        help="run this chain of the preset (its index, or its models joined by '+', as "
        "`stems presets` lists them), e.g. a fallback; default: the best one installed",
    )
    sp.add_argument(
        "--restore",
        metavar="PRESET[:STRENGTH]",
        help="also write a restored copy of each stem (e.g. universal_enhancer:0.7)",
    )
    custom = sp.add_argument_group("custom preset")
    custom.add_argument("--prompt", help="what to extract, e.g. 'lead vocal'")
    custom.add_argument("--sam-model", choices=SAM_MODELS, default="sam-audio-base")
    custom.add_argument("--stereo-mode", choices=STEREO_MODES, default="mono")
    custom.add_argument("--spans", help="START:END[,START:END...] in seconds of the source: extract only there")
    sp.add_argument(
        "--stem-mp4",
        action="store_true",
        help="also write SOURCE.stem.mp4 (Native Instruments' Stem format for Traktor, Mixxx, Serato); "
        "needs a 4-stem preset such as 4_tracks",
    )
    sp.add_argument("--model-dir")
    sp.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default: STEMS_DEVICE)")
    sp.set_defaults(fn=cmd_split)

    ms = sub.add_parser("master", help="master a file locally, no server (loudness, tonal balance, true-peak limit)")
    _master_args(ms)
    ms.set_defaults(fn=cmd_master)

    remote = sub.add_parser("remote", help="use a stems server through its HTTP API").add_subparsers(
        dest="action", required=True
    )
    rs = remote.add_parser(
        "split",
        help="upload files to a server, split them there (several: in one batch), "
        "download the stems (several files: into OUT/<file name>/)",
    )
    rs.add_argument("files", nargs="+", metavar="FILE")
    rs.add_argument("--preset", required=True)
    rs.add_argument("--out", required=True)
    rs.add_argument(
        "--server",
        default=os.environ.get("STEMS_SERVER", "http://127.0.0.1:8000"),
        help="the API's base URL (default: $STEMS_SERVER, else http://127.0.0.1:8000)",
    )
    rs.add_argument("--key", default=os.environ.get("STEMS_API_KEY"), help="API key (default: $STEMS_API_KEY)")
    rs.add_argument("--selection", help="START:END in seconds")
    rs.add_argument("--bit-depth", type=int, choices=(16, 24, 32))
    rs.add_argument("--hq", choices=("aac", "mp3", "opus", "flac", "none"))
    rs.add_argument("--format", choices=("wav", "hq"), default="wav", help="which file of each stem to download")
    rs.set_defaults(fn=cmd_remote_split)
    rm = remote.add_parser("master", help="upload a file to a server, master it there, download the WAV")
    _master_args(rm)
    rm.add_argument("--server", default=os.environ.get("STEMS_SERVER", "http://127.0.0.1:8000"))
    rm.add_argument("--key", default=os.environ.get("STEMS_API_KEY"), help="API key (default: $STEMS_API_KEY)")
    rm.set_defaults(fn=cmd_remote_master)

    wk = sub.add_parser("worker", help="run a Celery worker")
    wk.add_argument("-Q", "--queues")
    wk.add_argument("-c", "--concurrency", type=int, default=1)
    wk.add_argument("-n", "--hostname")
    wk.add_argument("--loglevel", default="INFO")
    wk.set_defaults(fn=cmd_worker)

    st = sub.add_parser("settings", help="print the settings table (markdown)")
    st.set_defaults(fn=cmd_settings)

    sk = sub.add_parser("stack", help="the development stack (make up / down / run)")
    sk.add_argument("action", choices=("up", "down", "demo"))
    sk.add_argument("--file", help="demo: the audio file to split (default: Spleeter's example song)")
    sk.add_argument("--preset", help="demo: the preset (default: 2_tracks)")
    sk.add_argument("--selection", help="demo: START:END in seconds")
    sk.set_defaults(fn=cmd_stack)

    args = ap.parse_args(argv)
    status: int = args.fn(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
