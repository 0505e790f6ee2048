"""The crash-point simulator (tests/crashsim.py) over whole jobs: one-stage, two-stage, with a cancel, a
deletion and the retention sweep interleaved.

Each scenario is first run without a fault to number its points (every write to Redis, every storage
put/list/delete, every broker publish, of the worker and of the interleaved API call); then once per point
and fault (crash, error, pause longer than the lease), each followed by recovery to quiescence and the
invariants of `workers/jobstate.py` (see `crashsim.check`). It prints how many points and faults it
covered. In-process, against the test Redis and moto's S3 server.
"""

from __future__ import annotations

import io
import time
import uuid

import pytest
import soundfile as sf

from stems.models import DELIVERY_QUEUE, JobStatus, StemStatus
from tests.crashsim import FAULTS, Crash, Plan, Proc, World, check, process_ctx
from tests.inproc import api_client, queued_job, worker_ctx
from tests.support import tone_mix, write_audio

SR = 44100
SECONDS = 0.5
GPU = "gpu-sim"
LEASE_S = 30.0
# the reaper's clock in recovery: past every lease, enqueue grace and retry backoff, short of any deadline
SHIFT_S = LEASE_S + 10.0 + 95.0


def _is_stem_put(label: str) -> bool:
    return label.startswith("storage.put_file users/") and "/jobs/" in label and "/separated/" not in label


SCENARIOS = {
    # name: (two-stage, action name, when the action runs: a predicate on the point about to be made)
    "one-stage": (False, None, None),
    "two-stage": (True, None, None),
    "one-stage+cancel": (False, "cancel", _is_stem_put),
    "two-stage+cancel-waiting": (True, "cancel", lambda label: label == "broker.stems.deliver"),
    "one-stage+delete-audio": (False, "delete", _is_stem_put),
    "one-stage+retention": (False, "retention", None),
}


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("song") / "song.wav", tone_mix(SECONDS, SR), SR)


@pytest.fixture(autouse=True)
def no_load_pruning(monkeypatch):
    import workers.reaper

    monkeypatch.setattr(workers.reaper, "PRUNE_EVERY", 10**9)  # the load lists must be right by themselves


def _api_services(ctx):
    from api.deps import Services

    return Services(settings=ctx.settings, store=ctx.store, storage=ctx.storage, models=None, celery=None)


def _action(name: str, job, user: str, actx, sctx):
    """The interleaved call, as its process makes it (`actx`: the API's; `sctx`: the worker's, for retention)."""
    from api.routes_stems import cancel
    from stems.lifecycle import delete_asset, sweep

    def run() -> None:
        try:
            if name == "cancel":
                cancel(uuid.UUID(job.id), _api_services(actx), user)
            elif name == "delete":
                delete_asset(actx.store, actx.storage, actx.store.get_asset(job.audio_id))
            elif name == "retention":
                sweep(sctx.store, sctx.storage, sctx.settings, now=time.time() + SHIFT_S)
        except (Crash, Exception):  # the API request died or answered an error; the worker goes on
            pass

    return run


def run_scenario(ctx, song, name: str, target: int = 0, kind: str = "crash", client=None) -> tuple[Plan, list[str]]:
    """One run of scenario `name` with `kind` at point `target` (0: no fault); its points and what is wrong
    (with `client`, the API's, downloads are checked too)."""
    two_stage, action, when = SCENARIOS[name]
    user = f"s{uuid.uuid4().hex[:10]}"
    world = World(ctx, SHIFT_S)
    plan = Plan(target=target, kind=kind, on_pause=world.recover)
    worker, api = Proc(plan, "worker"), Proc(plan, "api")
    sctx, actx = process_ctx(ctx, worker), process_ctx(ctx, api)
    job = queued_job(
        ctx,
        song,
        user=user,
        queue=GPU if two_stage else DELIVERY_QUEUE,
        seconds=SECONDS,
        callback_url="http://hooks.invalid/done",
        hq_format=None,
    )  # no encoder process: fast runs
    ctx.store.settle("split", job.id)  # the API sent its message
    world.broker.queue.append(("stems.split", job.id))
    run = _action(action, job, user, actx, sctx) if action else None
    if run is not None and when is not None:
        plan.actions.append((when, run))
    app = world.broker.app(worker)
    while world.broker.queue and not worker.dead:
        message = world.broker.queue.popleft()
        try:
            world.run_message(*message, sctx, app)
        except Crash:  # late acks: the message of a worker that died goes back to the queue
            world.broker.queue.appendleft(message)
        except Exception:  # the task failed: its message is acked (what it owes is in the outbox)
            pass
    if action == "retention":
        if not worker.dead:
            run()
        world.retention = True
    world.recover()
    bad = check(world, job.id, user, (GPU, DELIVERY_QUEUE), deleted_ok=action in ("delete", "retention"))
    plan.duplicate_webhooks = max(0, len(world.webhooks.get(job.id, [])) - 1)
    return plan, bad + (check_downloads(ctx, client, job.id, user) if client is not None else [])


def check_downloads(ctx, client, job_id: str, user: str) -> list[str]:
    """Through the API: every stem of a complete job downloads whole; no stem of any other job downloads."""
    job = ctx.store.get_job(job_id)
    if job is None:
        return []
    key = ctx.store.create_key(user)
    bad = []
    for stem in ctx.store.get_stems(job.stem_ids + job.upscaled_ids):
        try:
            r = client.get(f"/download/stem/{stem.id}", headers={"x-api-key": key})
        except Exception as exc:  # the API answered 200 and then found no object to stream
            bad.append(f"stem {stem.name}: the download broke off ({exc.__class__.__name__}: {exc})")
            continue
        if job.status != JobStatus.complete or stem.status != StemStatus.complete:
            if r.status_code == 200:
                bad.append(f"stem {stem.name} of a {job.status.value} job downloads")
            continue
        if r.status_code != 200 or len(r.content) != stem.wav_size:
            bad.append(f"stem {stem.name}: {r.status_code}, {len(r.content)} bytes of {stem.wav_size}")
            continue
        frames = sf.info(io.BytesIO(r.content)).frames
        if frames != round(SECONDS * SR):
            bad.append(f"stem {stem.name}: {frames} frames, not {round(SECONDS * SR)}")
    return bad


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_crash_point(name, tmp_path, redis_url, s3_url, song, capsys):
    ctx = worker_ctx(
        tmp_path,
        redis_url,
        s3_url,
        lease_s=LEASE_S,
        lease_renew_s=LEASE_S / 3,
        two_stage="always" if SCENARIOS[name][0] else "never",
        retain_stems_s=60.0,
        retain_records_s=120.0,
        retain_originals_s=60.0,
    )
    t0 = time.monotonic()
    plan, bad = run_scenario(ctx, song, name)
    assert not bad, f"{name} without a fault: {bad}"
    points = list(plan.labels)
    assert points, "no external call was seen: the wrappers do not see the clients"
    failures, runs, duplicates = [], 0, 0
    with api_client(ctx) as client:
        for target in range(1, len(points) + 1):
            for kind in FAULTS:
                plan, bad = run_scenario(ctx, song, name, target, kind, client)
                runs += plan.fired is not None  # a run with fewer calls than the numbering run fires nothing
                duplicates += plan.duplicate_webhooks > 0
                if bad:
                    failures.append(f"{plan.fired or f'{kind} at #{target} (not reached)'}: {bad}")
    took = time.monotonic() - t0
    with capsys.disabled():
        print(
            f"\ncrash points [{name}]: {len(points)} points x {len(FAULTS)} faults = {runs} runs, "
            f"{len(failures)} with a broken invariant, {duplicates} with a webhook sent twice, {took:.0f} s"
        )
    assert not failures, "\n".join(failures[:20])
