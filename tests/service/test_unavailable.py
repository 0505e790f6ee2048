"""Every route with storage, Redis or the broker down: 503 naming the dependency, with Retry-After, never a 500;
and everything works again once the dependency is back, with no service restarted.

One real stack for the whole matrix: the API and a CPU worker (processes), a Redis of the test's own
(AOF, so a stop and a restart keep every key), a second Redis as the Celery broker (so the broker can
go down alone), and moto's S3 server behind a TCP forwarder (moto keeps buckets in memory only, so the
endpoint goes down by closing the forwarder's port: connection refused, pooled connections reset).
The dependencies go down in turn: the bucket deleted (its objects kept aside, put back after), the S3
endpoint stopped, Redis stopped, the broker stopped. Each outage walks every operation of the OpenAPI
document, plus the page, /docs and the document itself. Then the dependency comes back; /readyz turns
200; the walk answers as it did before the outage; a new upload imports, splits and downloads (the
worker recovered too); and storage and records agree: no record without its object, no object
without its record.

The matrix (routes x outages, status and code) is printed even when the test passes, and written as
JSON to $STEMS_MATRIX_OUT when set. With STEMS_MATRIX_RECORD=1 the test records without asserting (how
the matrix of an older tree is taken: copy this file and tests/tcpproxy.py into its checkout).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest

from stems import rediskeys as K
from stems.redisboot import free_port, start_redis
from tests.support import ServiceStack, start_moto, tone_mix, upload, wait_for, write_audio
from tests.tcpproxy import TcpProxy
from tests.webserver import WebServer

SR = 44100
RECORD_ONLY = os.environ.get("STEMS_MATRIX_RECORD") == "1"

# what answers without any dependency: no key to look up, nothing stored
NO_DEPENDENCY = {"GET /healthz", "GET /openapi.json", "GET /docs", "GET /"}
STORAGE = {
    "POST /from-file",
    "POST /from-storage",
    "DELETE /audio/{audio_id}",
    "DELETE /stem_split/{creation_id}",
    "GET /download/stem/{stem_id}",
    "POST /download-archive",
    "GET /stem/{stem_id}/peaks",
    "GET /audio/{audio_id}/peaks",
    "GET /download/mastered/{mastered_id}",
    "DELETE /mastered/{mastered_id}",
}
# a batch answers 200 with each item's own answer: its one item says 503 broker_unavailable (see `call`)
BROKER = {"POST /from-file", "POST /from-link", "POST /from-storage", "POST /create-stems", "POST /master-audio"}
OUTAGES = ("bucket deleted", "S3 endpoint stopped", "Redis stopped", "broker stopped")
NEEDS = {
    "bucket deleted": ("storage_unavailable", STORAGE),
    "S3 endpoint stopped": ("storage_unavailable", STORAGE),
    "Redis stopped": ("redis_unavailable", None),
    "broker stopped": ("broker_unavailable", BROKER),
}
WALKS = 1 + 2 * len(OUTAGES)  # before, and during and after each outage: each takes its own things to delete


@dataclass
class Cell:
    status: int  # 0: no answer (the connection dropped mid-answer)
    code: str | None = None
    retry_after: str | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        if not self.status:
            return f"no answer ({self.code})"
        short = (self.code or "").removesuffix("_unavailable")
        return f"{self.status} {short}".strip()


@dataclass
class World:
    c: httpx.Client
    user: str
    song: bytes
    audio_id: str = ""
    job_id: str = ""
    stem_id: str = ""
    cancelled_id: str = ""
    ingest_key: str = ""
    link: str = ""
    delete_audio: list[str] = field(default_factory=list)
    delete_split: list[str] = field(default_factory=list)
    mastered_id: str = ""
    delete_mastered: list[str] = field(default_factory=list)


def operations(w: World, walk: int) -> dict[str, tuple[str, str, dict]]:
    """One request per operation, keyed `METHOD /path` as in the OpenAPI document."""
    return {
        "POST /from-file": ("POST", "/from-file", {"files": {"file": ("song.wav", w.song, "audio/wav")}}),
        "POST /from-link": ("POST", "/from-link", {"json": {"url": w.link}}),
        "POST /from-storage": ("POST", "/from-storage", {"json": {"key": w.ingest_key}}),
        "GET /status/audio/{audio_id}": ("GET", f"/status/audio/{w.audio_id}", {}),
        "DELETE /audio/{audio_id}": ("DELETE", f"/audio/{w.delete_audio[walk]}", {}),
        "GET /audio/{audio_id}/peaks": ("GET", f"/audio/{w.audio_id}/peaks", {}),
        "POST /create-stems": (
            "POST",
            "/create-stems",
            {"json": {"preset": "phantom_center", "audio_id": w.audio_id, "hq_streaming_format": "none"}},
        ),
        "GET /status/stem_split/{creation_id}": ("GET", f"/status/stem_split/{w.job_id}", {}),
        "GET /stem_split": ("GET", "/stem_split", {"params": {"limit": 5}}),
        "POST /cancel/{creation_id}": ("POST", f"/cancel/{w.cancelled_id}", {}),
        "DELETE /stem_split/{creation_id}": ("DELETE", f"/stem_split/{w.delete_split[walk]}", {}),
        "GET /download/stem/{stem_id}": ("GET", f"/download/stem/{w.stem_id}", {}),
        "POST /download-archive": ("POST", "/download-archive", {"json": {"creation_id": w.job_id}}),
        "POST /download-links": ("POST", "/download-links", {"json": {"stem_ids": [w.stem_id]}}),
        "GET /stem/{stem_id}/peaks": ("GET", f"/stem/{w.stem_id}/peaks", {}),
        "POST /create-stems/batch": (
            "POST",
            "/create-stems/batch",
            {"json": {"items": [{"preset": "phantom_center", "audio_id": w.audio_id, "hq_streaming_format": "none"}]}},
        ),
        "POST /master-audio": ("POST", "/master-audio", {"json": {"audio_id": w.audio_id}}),
        "GET /status/mastered/{mastered_id}": ("GET", f"/status/mastered/{w.mastered_id}", {}),
        "GET /download/mastered/{mastered_id}": ("GET", f"/download/mastered/{w.mastered_id}", {}),
        "DELETE /mastered/{mastered_id}": ("DELETE", f"/mastered/{w.delete_mastered[walk]}", {}),
        "GET /presets": ("GET", "/presets", {}),
        "GET /usage": ("GET", "/usage", {}),
        "GET /healthz": ("GET", "/healthz", {}),
        "GET /readyz": ("GET", "/readyz", {}),
        "GET /openapi.json": ("GET", "/openapi.json", {}),
        "GET /docs": ("GET", "/docs", {}),
        "GET /": ("GET", "/", {}),
    }


def call(c: httpx.Client, method: str, path: str, kw: dict) -> Cell:
    t0 = time.monotonic()
    try:
        r = c.request(method, path, timeout=120, **kw)
    except httpx.HTTPError as exc:  # e.g. a download that started 200 and broke off
        return Cell(0, exc.__class__.__name__, seconds=time.monotonic() - t0)
    code = None
    if r.headers.get("content-type", "").startswith("application/json") and r.status_code >= 300:
        body = r.json()
        code = body.get("code")
        if path == "/readyz":  # the readiness answer names its failing checks
            code = "+".join(k for k, v in body.get("checks", {}).items() if v != "ok") or None
    if path == "/create-stems/batch" and r.status_code == 200:  # the item's own answer
        item = r.json()["items"][0]
        code = item.get("code") if item.get("status") == "error" else None
    return Cell(r.status_code, code, r.headers.get("retry-after"), time.monotonic() - t0)


def walk(w: World, n: int) -> dict[str, Cell]:
    return {op: call(w.c, *req) for op, req in operations(w, n).items()}


def expected(outage: str, op: str, before: Cell) -> tuple[int, str | None]:
    if op == "GET /readyz":
        return 503, None  # (its failing check is asserted apart)
    code, needing = NEEDS[outage]
    if op in NO_DEPENDENCY or (needing is not None and op not in needing):
        return before.status, before.code
    return 503, code


class Deps:
    """Redis, the broker's Redis and the S3 endpoint of the stack, each of which the test can take down."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis_port, self.broker_port = free_port(), free_port()
        self.redis, self.redis_url = start_redis(tmp / "redis", port=self.redis_port, persist=True)
        self.broker, self.broker_url = start_redis(tmp / "broker", port=self.broker_port, persist=True)
        self.moto, self.moto_url = start_moto(tmp / "moto.log")
        self.proxy = TcpProxy(int(self.moto_url.rsplit(":", 1)[1]))
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.moto_url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        self.bucket = ""
        self.kept: dict[str, bytes] = {}

    def down(self, outage: str) -> None:
        if outage == "bucket deleted":
            keys = [
                o["Key"]
                for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
                for o in page.get("Contents", [])
            ]
            self.kept = {k: self.s3.get_object(Bucket=self.bucket, Key=k)["Body"].read() for k in keys}
            for k in keys:
                self.s3.delete_object(Bucket=self.bucket, Key=k)
            self.s3.delete_bucket(Bucket=self.bucket)
        elif outage == "S3 endpoint stopped":
            self.proxy.stop()
        elif outage == "Redis stopped":
            _stop(self.redis)
        elif outage == "broker stopped":
            _stop(self.broker)

    def up(self, outage: str) -> None:
        if outage == "bucket deleted":
            self.s3.create_bucket(Bucket=self.bucket)
            for k, data in self.kept.items():
                self.s3.put_object(Bucket=self.bucket, Key=k, Body=data)
        elif outage == "S3 endpoint stopped":
            self.proxy.start()
        elif outage == "Redis stopped":
            self.redis, _ = start_redis(self.tmp / "redis", port=self.redis_port, persist=True)
        elif outage == "broker stopped":
            self.broker, _ = start_redis(self.tmp / "broker", port=self.broker_port, persist=True)

    def close(self) -> None:
        self.proxy.stop()
        self.moto.stop()
        for proc in (self.redis, self.broker):
            _stop(proc)


def _stop(proc) -> None:
    """SIGTERM: Redis writes its AOF and exits, as `systemctl stop redis` or `docker stop` does."""
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def audit(s: ServiceStack, user: str) -> list[str]:
    """What storage and the records disagree on, for `user`: objects without records, records without objects."""
    objects = set(s.objects(f"users/{user}/"))
    assets, jobs = _records(s, K.AUDIO, user), _records(s, K.JOB, user)
    asset_ids, job_ids = {a.id for a in assets}, {j.id for j in jobs}
    masters = s.store.masterings
    problems = []
    for key in sorted(objects):
        kind, owner = key.split("/")[2:4]
        if owner not in (asset_ids if kind == "audio" else job_ids) and not (kind == "jobs" and masters.get(owner)):
            problems.append(f"object without its record: {key}")
    for a in assets:
        if a.origin == "upload" and a.status.value != "expired" and a.object_key not in objects:
            problems.append(f"audio {a.id} ({a.status.value}) without its original")
    for j in jobs:
        if j.status.value == "complete":
            for stem in s.store.get_stems(j.stem_ids):
                if stem.status.value == "complete" and stem.wav_key not in objects:
                    problems.append(f"stem {stem.id} of job {j.id} without its WAV")
    return problems


def _records(s: ServiceStack, kind: str, user: str) -> list:
    get = s.store.get_asset if kind == K.AUDIO else s.store.get_job
    found = (get(id_) for id_ in s.store.ids(kind))
    return [r for r in found if r is not None and r.user_id == user]


def _masterings(s: ServiceStack, user: str) -> list:
    found = (s.store.masterings.get(id_) for id_ in s.store.ids(K.MASTERING))
    return [m for m in found if m is not None and m.user_id == user]


def idle(s: ServiceStack, user: str, timeout: float = 180) -> str:
    """Wait until every import and split of `user` ended, so nothing writes while a dependency goes down."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [f"audio {a.id}" for a in _records(s, K.AUDIO, user) if a.status.value == "processing"] + [
            f"job {j.id}" for j in _records(s, K.JOB, user) if not j.status.terminal
        ]
        busy += [f"mastering {m}" for m in _masterings(s, user) if m.status.value in ("queued", "processing")]
        if not busy:
            return "ok"
        time.sleep(0.3)
    return f"still running after {timeout:.0f} s: {busy}"


def works(w: World, song_path: Path) -> str:
    """A new upload imports and splits, and its stem downloads: the API and the worker both recovered."""
    try:
        audio = upload(w.c, song_path, timeout=120)
        assert audio["status"] == "complete", audio
        r = w.c.post(
            "/create-stems",
            json={"preset": "phantom_center", "audio_id": audio["audio_id"], "hq_streaming_format": "none"},
        )
        assert r.status_code == 200, r.text
        done = wait_for(w.c, f"/status/stem_split/{r.json()['creation_id']}", {"complete", "failed"}, 180)
        assert done["status"] == "complete", done
        got = w.c.get(done["stems"][0]["download"]["wav"])
        assert got.status_code == 200 and got.content[:4] == b"RIFF", got.status_code
        return "ok"
    except AssertionError as exc:
        return f"FAILED: {str(exc)[:300]}"


def table(matrix: dict[str, dict[str, Cell]], columns: list[str]) -> str:
    ops = list(next(iter(matrix.values())))
    width = max(map(len, ops))
    cols = [(c, max(len(c), *(len(str(matrix[c][op])) for op in ops))) for c in columns]
    lines = [f"{'route':{width}} | " + " | ".join(f"{c:{n}}" for c, n in cols)]
    lines.append("-" * len(lines[0]))
    for op in ops:
        lines.append(f"{op:{width}} | " + " | ".join(f"{str(matrix[c][op]):{n}}" for c, n in cols))
    slowest = {c: max(cell.seconds for cell in matrix[c].values()) for c, _ in cols}
    lines.append(f"{'slowest answer (s)':{width}} | " + " | ".join(f"{slowest[c]:<{n}.1f}" for c, n in cols))
    return "\n".join(lines)


@pytest.mark.timeout(1800)
def test_every_route_answers_503_naming_the_dependency_and_recovers(tmp_path, capsys):
    deps = Deps(tmp_path)
    web = WebServer()
    s = ServiceStack(
        tmp_path / "stack",
        deps.redis_url,
        deps.proxy.url,
        STEMS_BROKER_URL=deps.broker_url,
        STEMS_RATE_LIMIT_PER_MINUTE="100000",
    )
    deps.bucket = s.env["S3_BUCKET"]
    matrix: dict[str, dict[str, Cell]] = {}
    notes: dict[str, str] = {}
    try:
        s.start_api()
        worker = s.start_worker("cpu", "w")
        song_path = write_audio(tmp_path / "song.wav", tone_mix(2.0, SR), SR)
        web.files["/song.wav"] = song_path.read_bytes()
        user = "matrix"
        w = World(c=s.client(user), user=user, song=song_path.read_bytes(), link=web.url("/song.wav"))
        w.audio_id = upload(w.c, song_path)["audio_id"]
        r = w.c.post("/create-stems", json={"preset": "phantom_center", "audio_id": w.audio_id})
        assert r.status_code == 200, r.text
        w.job_id = r.json()["creation_id"]
        w.stem_id = wait_for(w.c, f"/status/stem_split/{w.job_id}", {"complete"}, 120)["stems"][0]["stem_id"]
        w.delete_audio = [upload(w.c, song_path)["audio_id"] for _ in range(WALKS)]
        masterings = [w.c.post("/master-audio", json={"audio_id": w.audio_id}) for _ in range(WALKS + 1)]
        assert all(r.status_code == 200 for r in masterings), [r.text for r in masterings]
        for r in masterings:
            wait_for(w.c, f"/status/mastered/{r.json()['mastered_id']}", {"complete"}, 180)
        w.mastered_id, w.delete_mastered = (
            masterings[0].json()["mastered_id"],
            [r.json()["mastered_id"] for r in masterings[1:]],
        )
        w.ingest_key = f"ingest/{user}/track.wav"
        deps.s3.put_object(Bucket=deps.bucket, Key=f"{s.env['S3_PREFIX']}/{w.ingest_key}", Body=w.song)
        # splits that end cancelled before the worker sees them (it is frozen meanwhile): what /cancel and
        # DELETE /stem_split act on, the same in every walk
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            made = []
            for _ in range(WALKS + 1):
                r = w.c.post("/create-stems", json={"preset": "phantom_center", "audio_id": w.audio_id})
                assert r.status_code == 200, r.text
                made.append(r.json()["creation_id"])
                assert w.c.post(f"/cancel/{made[-1]}").json()["status"] == "cancelled"
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        w.cancelled_id, w.delete_split = made[0], made[1:]

        doc = w.c.get("/openapi.json").json()
        documented = {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops}
        assert documented <= set(operations(w, 0)), (
            f"operations the walk does not call: {documented - set(operations(w, 0))}"
        )

        matrix["all up"] = walk(w, 0)
        for i, outage in enumerate(OUTAGES):
            notes[f"{outage}: idle before"] = idle(s, user)
            deps.down(outage)
            try:
                matrix[outage] = walk(w, 1 + 2 * i)
            finally:
                deps.up(outage)
            deadline = time.monotonic() + 90
            while (ready := call(w.c, "GET", "/readyz", {})).status != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            notes[f"{outage}: /readyz after"] = str(ready)
            matrix[f"{outage}, then back"] = walk(w, 2 + 2 * i)
            notes[f"{outage}: new upload, split, download after"] = works(w, song_path)
            notes[f"{outage}: idle after"] = idle(s, user)
            notes[f"{outage}: storage and records after"] = "; ".join(audit(s, user)) or "agree"
    finally:
        columns = [c for c in ["all up", *(x for o in OUTAGES for x in (o, f"{o}, then back"))] if c in matrix]
        report = table(matrix, columns) if matrix else "(no walk ran)"
        report += "\n" + "\n".join(f"{k}: {v}" for k, v in notes.items())
        with capsys.disabled():
            print("\n" + report)
        if os.environ.get("STEMS_MATRIX_OUT"):
            Path(os.environ["STEMS_MATRIX_OUT"]).write_text(
                json.dumps(
                    {
                        "matrix": {c: {op: vars(cell) for op, cell in col.items()} for c, col in matrix.items()},
                        "notes": notes,
                        "table": report,
                    },
                    indent=1,
                )
            )
        s.stop()
        web.close()
        deps.close()

    if RECORD_ONLY:
        return
    before = matrix["all up"]
    assert all(cell.status < 400 for cell in before.values()), before
    ready_code = {
        "bucket deleted": "storage",
        "S3 endpoint stopped": "storage",
        "Redis stopped": "redis",
        "broker stopped": "broker",
    }
    batch = {o: matrix[o]["POST /create-stems/batch"].code for o in OUTAGES}
    assert batch["broker stopped"] == "broker_unavailable" and batch["bucket deleted"] is None, batch
    for outage in OUTAGES:
        for op, cell in matrix[outage].items():
            status, code = expected(outage, op, before[op])
            if op == "GET /readyz":
                assert (cell.status, cell.code) == (503, ready_code[outage]), (outage, op, str(cell))
            elif status == 503:
                assert (cell.status, cell.code) == (503, code), (outage, op, str(cell))
            else:
                assert cell.status == status, (outage, op, str(cell))
            if cell.status == 503:
                assert cell.retry_after and int(cell.retry_after) > 0, (outage, op, str(cell))
        back = matrix[f"{outage}, then back"]
        assert {op: c.status for op, c in back.items()} == {op: c.status for op, c in before.items()}, outage
        assert notes[f"{outage}: new upload, split, download after"] == "ok", outage
        assert notes[f"{outage}: storage and records after"] == "agree", outage
        assert notes[f"{outage}: idle before"] == notes[f"{outage}: idle after"] == "ok", outage


def _moto_enforcing_credentials(tmp: Path):
    """moto's S3 server checking credentials as AWS does: keys it never issued are refused (403)."""
    saved = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    try:
        return start_moto(tmp / "moto-auth.log")
    finally:
        if saved is None:
            os.environ.pop("INITIAL_NO_AUTH_ACTION_COUNT")
        else:
            os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = saved


def _api(tmp: Path, name: str, env: dict) -> tuple:
    from stems.stack import api_proc, wait_http

    port = free_port()
    proc = api_proc(env, port, tmp / f"api-{name}.log").start()
    wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
    return proc, f"http://127.0.0.1:{port}"


def test_refusals_name_their_reason_and_echo_no_secret(tmp_path, redis_url):
    """Refused credentials (storage, broker, Redis) and an S3 endpoint that never answers: 503 with the reason and
    what to check, one warning line each at start-up, and no secret, bucket, endpoint or key in any answer."""
    from tests.blackhole import Server, silent

    song = write_audio(tmp_path / "song.wav", tone_mix(1.0, SR), SR).read_bytes()
    s3_secret, broker_password, redis_password = (
        "s3-secret-" + "x" * 20,
        "broker-pw-" + "y" * 20,
        "redis-pw-" + "z" * 20,
    )
    moto, moto_url = _moto_enforcing_credentials(tmp_path)
    broker, broker_url = start_redis(tmp_path / "broker", password=broker_password)
    guarded, guarded_url = start_redis(tmp_path / "guarded", password=redis_password)
    hung = Server(silent)
    s = ServiceStack(tmp_path / "stack", redis_url, None)
    bucket = "bucket-" + s.prefix
    base_env = {
        **s.env,
        "STEMS_STORAGE": "s3",
        "S3_BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": "AKIANOTISSUED",
        "AWS_SECRET_ACCESS_KEY": s3_secret,
        "S3_PREFIX": "svc",
        "S3_TIMEOUT_S": "1",
    }
    secrets = (
        s3_secret,
        broker_password,
        redis_password,
        bucket,
        str(int(moto_url.rsplit(":", 1)[1])),
        str(hung.port),
        "users/",
    )
    procs = []
    try:
        # storage refuses our credentials; the broker refuses its password; Redis is fine
        proc, base = _api(
            tmp_path,
            "denied",
            {
                **base_env,
                "S3_ENDPOINT_URL": moto_url,
                "STEMS_BROKER_URL": broker_url.replace(broker_password, "wrong-password"),
            },
        )
        procs.append(proc)
        with httpx.Client(base_url=base, headers={"x-api-key": s.store.create_key("denied")}, timeout=60) as c:
            answers = {
                "ready": c.get("/readyz"),
                "file": c.post("/from-file", files={"file": ("a.wav", song)}),
                "link": c.post("/from-link", json={"url": "http://127.0.0.1:9/a.wav"}),
            }
        ready = answers["ready"].json()["checks"]
        assert answers["ready"].status_code == 503 and ready["redis"] == "ok", ready
        assert ready["storage"].startswith("unavailable: access_denied") and "S3_SECRET_ACCESS_KEY" in ready["storage"]
        assert ready["broker"].startswith("unavailable: access_denied") and "STEMS_BROKER_URL" in ready["broker"]
        for what, code in (("file", "storage_unavailable"), ("link", "broker_unavailable")):
            r = answers[what]
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
            assert r.json()["code"] == code and r.json()["reason"] == "access_denied", r.text
        log = (tmp_path / "api-denied.log").read_text()
        assert "stems api: warning: storage is unavailable (access denied)" in log, log
        assert "stems api: warning: the job queue (broker) is unavailable (access denied)" in log, log
        assert broker_password not in log and s3_secret not in log  # the operator's log names hosts, never secrets

        # Redis refuses its password; the S3 endpoint accepts connections and never answers
        proc, base = _api(
            tmp_path,
            "hung",
            {
                **base_env,
                "REDIS_URL": guarded_url.replace(redis_password, "wrong-pw"),
                "STEMS_BROKER_URL": redis_url,
                "S3_ENDPOINT_URL": f"http://127.0.0.1:{hung.port}",
            },
        )
        procs.append(proc)
        with httpx.Client(base_url=base, headers={"x-api-key": "stk_whatever"}, timeout=60) as c:
            answers |= {"usage": c.get("/usage"), "ready2": c.get("/readyz")}
        r = answers["usage"]
        assert r.status_code == 503 and r.json()["code"] == "redis_unavailable", r.text
        assert r.json()["reason"] == "access_denied" and "REDIS_URL" in r.json()["detail"], r.text
        checks = answers["ready2"].json()["checks"]
        assert checks["redis"].startswith("unavailable: access_denied"), checks
        assert checks["storage"].startswith("unavailable: timeout") and "S3_TIMEOUT_S" in checks["storage"], checks
        assert checks["broker"] == "ok", checks
        for name, r in answers.items():
            for secret in secrets:
                assert secret not in r.text, (name, secret, r.text)
    finally:
        for proc in procs:
            proc.stop()
        hung.close()
        moto.stop()
        for proc in (broker, guarded):
            _stop(proc)


def test_make_up_says_what_is_not_ready_and_is_up_once_it_is(tmp_path, redis_url, s3_url):
    """`make up` (stems stack up) with its bucket missing: a warning line, then "not ready" with the reason, exit 1,
    and no "page ..." banner; with the bucket there, the same command is up."""
    import subprocess
    import sys

    from tests.support import ROOT

    bucket = f"up-{os.urandom(4).hex()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEMS_", "S3_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        REDIS_URL=redis_url,
        STEMS_KEY_PREFIX=f"up{os.urandom(3).hex()}",
        STEMS_STORAGE="s3",
        S3_ENDPOINT_URL=s3_url,
        S3_BUCKET=bucket,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        STEMS_API_PORT=str(free_port()),
        STEMS_FLOWER_PORT=str(free_port()),
        STEMS_MODEL_DIR=str(tmp_path / "models"),
        STEMS_DATA_DIR=str(tmp_path / "data"),
        STEMS_STARTUP_WAIT_S="3",
    )

    def stack(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "stems.cli", "stack", action],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )

    try:
        first = stack("up")
        assert first.returncode == 1, first.stdout + first.stderr
        assert "warning: storage is unavailable (bucket missing): the bucket does not exist" in first.stdout, (
            first.stdout
        )
        assert "not ready: storage: unavailable: bucket_missing" in first.stdout, first.stdout
        assert "page " not in first.stdout and "API key" not in first.stdout, first.stdout
        boto3.client(
            "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
        ).create_bucket(Bucket=bucket)
        second = stack("up")
        assert second.returncode == 0, second.stdout + second.stderr
        assert "warning" not in second.stdout and "page     http://127.0.0.1:" in second.stdout, second.stdout
    finally:
        stack("down")
