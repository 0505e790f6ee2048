"""`stems`: the command line: keys, models, presets, local splits, workers, and the dev stack."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _settings():
    from .settings import get_settings

    return get_settings()


def _model_store(args):
    from pipelines.modelstore import ModelStore

    return ModelStore(args.model_dir or _settings().model_dir)


def cmd_keys_create(args) -> int:
    from .jobstore import JobStore

    s = _settings()
    print(JobStore.from_url(s.redis_url, s.key_prefix).create_key(args.user))
    return 0


def cmd_models_list(args) -> int:
    from pipelines.registry import load_registry

    store = _model_store(args)
    rows = []
    for model_id, reason in store.installed().items():
        spec = load_registry()[model_id]
        rows.append((model_id, spec.family, spec.queue, "yes" if reason is None else "no", reason or ""))
    if args.json:
        print(json.dumps([dict(zip(("id", "family", "queue", "installed", "reason"), r)) for r in rows], indent=1))
    else:
        for r in rows:
            print(f"{r[0]:22} {r[1]:10} {r[2]:11} {r[3]:4} {r[4]}")
    return 0


def cmd_models_verify(args) -> int:
    problems = {k: v for k, v in _model_store(args).verify().items() if v}
    for model_id, problem in _model_store(args).verify().items():
        print(f"{model_id:22} {'ok' if not problem else problem}")
    return 1 if problems else 0


def cmd_models_install(args) -> int:
    from pipelines.errors import StemsError

    store = _model_store(args)
    try:
        entry = store.install(args.model_id, [Path(p) for p in args.files],
                              json.loads(args.params) if args.params else None)
        print(json.dumps({args.model_id: entry}, indent=1))
        if not args.no_prepare:
            _prepare(store, args.model_id)
    except StemsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _prepare(store, model_id: str) -> None:
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
        why = getattr(sep, "backend_reason", "")
        print(f"{model_id} loads and runs on {backend}" + (f" ({why})" if why else ""), file=sys.stderr)


def cmd_presets(args) -> int:
    from pipelines.errors import PresetError
    from pipelines.presets import load_catalogue

    store = _model_store(args)
    for p in load_catalogue().presets:
        try:
            _, chain = p.pick_chain(store.missing)
            status = "available  " + "+".join(chain.model_ids)
        except PresetError as exc:
            status = "missing    " + ", ".join(exc.fields["missing_models"])
        print(f"{p.name:24} {status}\n{'':24} -> {', '.join(p.output_stems())}")
    return 0


def _selection(text: str | None) -> tuple[float, float | None]:
    if not text:
        return 0.0, None
    start, _, end = text.partition(":")
    return float(start or 0), (float(end) if end else None)


def cmd_split(args) -> int:
    from tqdm import tqdm

    from pipelines import audio as A
    from pipelines.engine import Engine
    from pipelines.errors import StemsError

    start, end = _selection(args.selection)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        audio, sr = A.decode(Path(args.file), start, end)
        engine = Engine(_model_store(args), device=args.device, chunk_seconds=_settings().chunk_seconds)
        with tqdm(total=100, unit="%", desc=args.preset, file=sys.stderr) as bar:
            def progress(f: float, stage: str) -> None:
                bar.set_postfix_str(stage)
                bar.update(int(f * 100) - bar.n)

            result = engine.run(args.preset, audio, sr, progress=progress)
            bar.update(100 - bar.n)
        for name, data in result.stems.items():
            path = out / f"{name}.wav"
            A.write_wav(path, data, sr, args.bit_depth)
            if args.hq != "none":
                A.encode_hq(out / f"{name}.{A.hq_extension(args.hq)}", data, sr, args.hq)
            print(f"{path}\t{result.made_by[name]}")
    except StemsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_worker(args) -> int:
    from workers.celery_app import app

    queues = args.queues or _settings().worker_queues
    argv = ["worker", "-Q", queues, "-c", str(args.concurrency), "-O", "fair", "--loglevel", args.loglevel, "-E"]
    if args.hostname:
        argv += ["-n", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_settings(args) -> int:
    from .settings import Settings

    print("| variable | default | meaning |\n|---|---|---|")
    for name, field in Settings.model_fields.items():
        env = field.validation_alias.choices[0] if field.validation_alias else name.upper()
        default = field.get_default(call_default_factory=True)
        print(f"| `{env}` | `{default if default not in (None, '') else ''}` | {field.description or ''} |")
    return 0


def cmd_stack(args) -> int:
    from . import stack

    return {"up": stack.up, "down": stack.down, "demo": stack.demo}[args.action]()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stems", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    kc = keys.add_parser("create", help="print a new API key for a user (stored hashed)")
    kc.add_argument("--user", required=True)
    kc.set_defaults(fn=cmd_keys_create)

    models = sub.add_parser("models", help="the model store").add_subparsers(dest="action", required=True)
    for name, fn, help_ in (("list", cmd_models_list, "every model id and whether it is installed"),
                            ("verify", cmd_models_verify, "check the sha256 of every installed file")):
        p = models.add_parser(name, help=help_)
        p.add_argument("--model-dir")
        p.add_argument("--json", action="store_true")
        p.set_defaults(fn=fn)
    mi = models.add_parser("install", help="copy weight files into the store and pin their sha256")
    mi.add_argument("model_id")
    mi.add_argument("files", nargs="+")
    mi.add_argument("--params", help="JSON object of family parameters overriding the registry's")
    mi.add_argument("--model-dir")
    mi.add_argument("--no-prepare", action="store_true",
                    help="do not load the model now (its derived files are then built on first use)")
    mi.set_defaults(fn=cmd_models_install)

    pr = sub.add_parser("presets", help="the catalogue with availability")
    pr.add_argument("--model-dir")
    pr.set_defaults(fn=cmd_presets)

    sp = sub.add_parser("split", help="split a file locally, no server")
    sp.add_argument("file")
    sp.add_argument("--preset", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--selection", help="START:END in seconds")
    sp.add_argument("--bit-depth", type=int, choices=(16, 24, 32), default=24)
    sp.add_argument("--hq", choices=("aac", "mp3", "opus", "flac", "none"), default="none")
    sp.add_argument("--model-dir")
    sp.add_argument("--device", default="cpu")
    sp.set_defaults(fn=cmd_split)

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
    sk.set_defaults(fn=cmd_stack)

    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
