"""Jobs survive the loss of a node: leases and the reaper, fenced attempts, consistent enqueue, bounded tasks.

Every fault is done for real to real processes, on both brokers (Redis, and RabbitMQ where
one answers): a worker's whole process group SIGKILLed (a reclaimed spot node) and a
replacement started; a worker frozen with SIGSTOP past its lease and thawed while another
runs its job (a paused VM, a partition); a pool process frozen past its hard time limit (a
native call that never returns); the API SIGKILLed while it waits on a hung broker, between
writing a job and queueing it; Redis SIGKILLed mid-job; SIGTERM to a worker's main process.
Leases, renewals and the reaper run at test speed (STEMS_LEASE_S=4 and so on).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from pipelines.presets import load_catalogue
from stems import rediskeys as K
from stems.redisboot import free_port, start_redis
from tests.blackhole import Server, endless_body, silent, trickle_headers
from tests.support import (
    LONG_S,
    SONG_S,
    TERMINAL,
    ServiceStack,
    child_pids,
    expected_objects,
    job_objects,
    start_job,
    tone_mix,
    upload,
    wait_for,
    wait_stage,
    write_audio,
)
from tests.webserver import WebServer

SR = 44100
# test-speed leases and reaper; no step cache, so every attempt really separates
FAST = {
    "STEMS_LEASE_S": "4",
    "STEMS_LEASE_RENEW_S": "1",
    "STEMS_REAPER_INTERVAL_S": "0.5",
    "STEMS_ENQUEUE_GRACE_S": "2",
    "STEMS_CACHE_MAX_BYTES": "0",
}
QUEUES = "cpu,gpu-demucs"


def _stack(tmp_path, redis_url, s3_url, models, broker, api: bool = True, **env) -> ServiceStack:
    s = ServiceStack(
        tmp_path, redis_url, s3_url, model_dir=models, broker=broker, STEMS_CHUNK_SECONDS="5", **{**FAST, **env}
    )
    if api:
        s.start_api()
    return s


def _minutes(seconds: float, preset: str = "4_tracks") -> float:
    return seconds / 60 * load_catalogue().preset(preset).usage_multiplier


def _complete_once(
    s: ServiceStack, c: httpx.Client, job_id: str, status: dict, attempts: int, seconds: float = SONG_S
) -> None:
    """One set of stems, every object downloadable, nothing else stored, the usage counted once."""
    assert status["status"] == "complete", status
    assert status["attempts"] == attempts, status
    assert [x["name"] for x in status["stems"]] == ["vocals", "drums", "bass", "other"]
    job = s.store.get_job(job_id)
    objects = job_objects(s, job_id)
    assert objects == expected_objects(s, job_id) and len(objects) == 12  # 4 WAV + 4 AAC + 4 peaks, no orphans
    assert all(k.startswith(f"users/{job.user_id}/jobs/{job_id}/{job.attempt_id}/") for k in objects)
    for stem in status["stems"]:
        assert c.get(stem["download"]["wav"]).status_code == 200
    usage = c.get("/usage").json()
    assert usage["jobs"] == 1 and usage["minutes"] == pytest.approx(_minutes(seconds), abs=1e-3), usage


def _nothing_left(s: ServiceStack, queues=("cpu", "gpu-demucs"), timeout: float = 15) -> None:
    """No lease, no owed message, no unfinished job counted for the autoscaler: nothing is stuck."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = {
            "running": s.store.running(),
            "owed": len(s.store.owed(time.time() + 3600)),
            **{f"load {q}": s.store.load(q) for q in queues},
        }
        if not any(left.values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"left over: {left}")


def test_whole_worker_killed_mid_split_completes_once(tmp_path, redis_url, s3_url, demucs_models, fault_song, broker):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    try:
        node = s.start_worker(QUEUES, "a")
        with s.client() as c:
            job_id = start_job(c, fault_song)
            wait_stage(s, job_id, "separating")
            os.killpg(node.pid, signal.SIGKILL)  # the whole group, parent included: the node is gone
            killed = time.monotonic()
            node.popen.wait(10)
            s.start_worker(QUEUES, "b")  # its replacement
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 90)
            assert time.monotonic() - killed < 90
            _complete_once(s, c, job_id, status, attempts=2)
            assert status["worker"].startswith("b@")
        _nothing_left(s)
    finally:
        s.stop()


def test_hard_time_limit_fails_the_job_frees_the_slot_and_sends_the_webhook(
    tmp_path, redis_url, s3_url, demucs_models, fault_song, broker
):
    # soft limit 3 s, hard kill at 3 * 1.2 + 1 = 4.6 s; the lease outlasts the kill
    s = _stack(
        tmp_path,
        redis_url,
        s3_url,
        demucs_models,
        broker,
        STEMS_TIME_LIMIT_BASE_S="3",
        STEMS_TIME_LIMIT_PER_AUDIO_S="0",
        STEMS_TIME_LIMIT_GRACE_S="1",
        STEMS_LEASE_S="8",
        STEMS_LEASE_RENEW_S="2",
    )
    web = WebServer()
    try:
        s.start_worker(QUEUES, "w")
        with s.client("limited") as c:
            audio_id = upload(c, fault_song)["audio_id"]
            job_id = start_job(c, fault_song, audio_id=audio_id, callback_url=web.url("/hook"))
            job = wait_stage(s, job_id)
            # the pool process freezes as in a native call that never returns: the soft limit cannot stop it,
            # the worker kills it at the hard limit, and the lease lapses
            os.kill(job.worker_pid, signal.SIGSTOP)
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 60)
            assert status["status"] == "failed" and status["error"]["code"] == "time_limit", status
            assert "hard time limit" in status["error"]["message"]
            assert s.store.active_jobs(s.store.get_job(job_id).user_id) == 0  # the quota slot is free again
            assert job_objects(s, job_id) == []
            (hit,) = web.wait_posts("/hook", 1, timeout=30)
            assert b'"failed"' in hit.body and job_id.encode() in hit.body
            # the worker serves on: a 1 s selection, well inside the 3 s limit even on a loaded machine (#24)
            ok = start_job(c, fault_song, "phantom_center", audio_id=audio_id, selection={"start": 0, "end": 1})
            assert wait_for(c, f"/status/stem_split/{ok}", TERMINAL, 120)["status"] == "complete"
        _nothing_left(s)
    finally:
        s.stop()
        web.close()


def test_two_deliveries_of_one_job_at_once_give_one_result(
    tmp_path, redis_url, s3_url, demucs_models, long_song, broker
):
    from workers.celery_app import make_celery
    from workers.messages import send_split

    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    try:
        workers = {"a": s.start_worker(QUEUES, "a"), "b": s.start_worker(QUEUES, "b")}
        with s.client() as c:
            job_id = start_job(c, long_song)
            first = wait_stage(s, job_id, "separating")
            # a second message for the running job (a broker redelivering it): the idle worker drops it
            send_split(make_celery(s.settings()), s.settings(), first)
            time.sleep(3)
            again = s.store.get_job(job_id)
            assert again.attempts == 1 and again.attempt_id == first.attempt_id, again
            # the running worker freezes past its lease; the other takes the job over ...
            runner = workers[first.worker.split("@")[0]]
            os.killpg(runner.pid, signal.SIGSTOP)
            try:
                second = wait_stage(s, job_id, "separating", timeout=300, attempts=2)
                assert second.worker != first.worker
            finally:
                os.killpg(runner.pid, signal.SIGCONT)  # ... and thaws: both runs go on at once
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 600)
            _complete_once(s, c, job_id, status, attempts=2, seconds=LONG_S)
            assert s.store.get_job(job_id).separated.attempt_id == second.attempt_id  # the winner separated it
            time.sleep(3)  # the thawed run stops at its next check; it must not have touched the winner's stems
            assert job_objects(s, job_id) == expected_objects(s, job_id)
            assert c.get("/usage").json()["jobs"] == 1
        _nothing_left(s)
    finally:
        s.stop()


def test_api_killed_between_writing_a_job_and_queueing_it(
    tmp_path, redis_url, s3_url, demucs_models, fault_song, broker
):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    hung = Server(silent)  # a broker that accepts and never answers: the API blocks in its send

    def broker_at(port: int) -> str:
        return broker.rsplit("@", 1)[0] + f"@127.0.0.1:{port}//" if broker else f"redis://127.0.0.1:{port}/0"

    try:
        s.start_worker(QUEUES, "w")
        body = {"preset": "phantom_center", "hq_streaming_format": "none"}
        with s.client("gap") as c:
            body["audio_id"] = upload(c, fault_song)["audio_id"]
            api, base = _api(s, broker_at(hung.port), "hung")
            posted = threading.Thread(target=_post_quietly, args=(base, c.headers, body, "gap-1"), daemon=True)
            posted.start()
            deadline = time.monotonic() + 30
            while not s.store.owed(time.time() + 3600) and time.monotonic() < deadline:
                time.sleep(0.02)
            (owed,) = s.store.owed(time.time() + 3600)
            assert owed[0] == "split"
            api.stop(signal.SIGKILL)  # between the job's write and its message
            killed = time.time()
            posted.join(10)
            job_id = owed[1]
            status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 60)
            assert status["status"] == "complete", status
            assert s.store.get_job(job_id).started_at - killed < 2 + 5  # STEMS_ENQUEUE_GRACE_S, then a reaper pass
            # the replay of its Idempotency-Key answers the job (its response was written with it), and queues nothing
            replay = c.post("/create-stems", json=body, headers={"Idempotency-Key": "gap-1"})
            assert replay.status_code == 200 and replay.json()["creation_id"] == job_id
            # a broker that refuses: 503 with Retry-After, nothing kept, the slot and the key free for the retry
            api, base = _api(s, broker_at(free_port()), "refused")
            try:
                jobs_before = len(s.store.ids(K.JOB))
                r = httpx.post(
                    base + "/create-stems", json=body, headers={**c.headers, "Idempotency-Key": "gap-2"}, timeout=60
                )
                assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
                assert r.json()["code"] == "broker_unavailable" and r.json()["reason"] == "unreachable", r.text
                assert "STEMS_BROKER_URL" in r.json()["detail"]
                assert len(s.store.ids(K.JOB)) == jobs_before
                assert s.store.active_jobs(s.store.get_job(job_id).user_id) == 0
            finally:
                api.stop()
            retry = c.post("/create-stems", json=body, headers={"Idempotency-Key": "gap-2"})
            assert retry.status_code == 200, retry.text
            assert (
                wait_for(c, f"/status/stem_split/{retry.json()['creation_id']}", TERMINAL, 60)["status"] == "complete"
            )
        _nothing_left(s)
    finally:
        s.stop()
        hung.close()


def _api(s: ServiceStack, broker_url: str, name: str):
    """A second API process of the stack, with its own broker URL."""
    from stems.stack import api_proc, wait_http

    port = free_port()
    proc = api_proc({**s.env, "STEMS_BROKER_URL": broker_url}, port, s.tmp / f"api-{name}.log").start()
    s.procs.append(proc)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
    return proc, f"http://127.0.0.1:{port}"


def _post_quietly(base: str, headers, body: dict, key: str) -> None:
    try:
        httpx.post(base + "/create-stems", json=body, headers={**headers, "Idempotency-Key": key}, timeout=60)
    except httpx.HTTPError:  # the API was killed mid-request
        pass


def test_redis_sigkilled_mid_job(tmp_path, s3_url, demucs_models, fault_song, broker):
    """Redis with AOF fsynced every second (what infra/ runs) dies without warning: both jobs end, once."""
    port = free_port()
    proc, url = start_redis(tmp_path / "redis", port=port, persist=True)
    s = _stack(tmp_path, url, s3_url, demucs_models, broker)
    try:
        s.start_worker(QUEUES, "w")
        with s.client() as c:
            audio_id = upload(c, fault_song)["audio_id"]
            running = start_job(c, fault_song, audio_id=audio_id)
            queued = start_job(c, fault_song, audio_id=audio_id)
            wait_stage(s, running, "separating")
            proc.kill()  # SIGKILL: no shutdown, no final fsync
            proc.wait(10)
            time.sleep(1.0)
            proc, _ = start_redis(tmp_path / "redis", port=port, persist=True)
            for job_id in (running, queued):
                status = wait_for(c, f"/status/stem_split/{job_id}", TERMINAL, 240)
                assert status["status"] == "complete", status
                assert status["attempts"] <= 2, status
                assert job_objects(s, job_id) == expected_objects(s, job_id) and len(job_objects(s, job_id)) == 12
            usage = c.get("/usage").json()
            assert usage["jobs"] == 2 and usage["minutes"] == pytest.approx(2 * _minutes(SONG_S), abs=1e-3), usage
        _nothing_left(s)
    finally:
        s.stop()
        proc.kill()
        proc.wait(10)


def test_sigterm_lets_the_job_finish_or_hands_it_back(tmp_path, redis_url, s3_url, demucs_models, fault_song, broker):
    s = _stack(tmp_path, redis_url, s3_url, demucs_models, broker)
    try:
        patient = s.start_worker(QUEUES, "patient", STEMS_SHUTDOWN_GRACE_S="300")
        with s.client() as c:
            audio_id = upload(c, fault_song)["audio_id"]
            finishes = start_job(c, fault_song, audio_id=audio_id)
            wait_stage(s, finishes, "separating")
            os.kill(patient.pid, signal.SIGTERM)  # to the main process, as Kubernetes and docker stop do
            # it finishes the separation it runs; the delivery stage goes to a CPU worker (it takes no more work)
            s.start_worker("cpu", "deliverer")
            status = wait_for(c, f"/status/stem_split/{finishes}", TERMINAL, 180)
            assert status["status"] == "complete" and status["attempts"] == 1, status
            assert status["worker"].startswith("patient@") and status["delivered_by"].startswith("deliverer@"), status
            assert patient.popen.wait(30) is not None  # and then it exits

            hasty = s.start_worker(QUEUES, "hasty", STEMS_SHUTDOWN_GRACE_S="0")
            handed = start_job(c, fault_song, audio_id=audio_id)
            wait_stage(s, handed, "separating")
            os.kill(hasty.pid, signal.SIGTERM)
            t0 = time.monotonic()
            hasty.popen.wait(60)  # the run stops at its next check, without finishing the job
            assert time.monotonic() - t0 < 30
            job = s.store.get_job(handed)
            assert job.status.value == "queued" and job.stage.startswith("handed back") and job.attempts == 0, job
            s.start_worker(QUEUES, "next")
            status = wait_for(c, f"/status/stem_split/{handed}", TERMINAL, 180)
            assert status["status"] == "complete" and status["attempts"] == 1, status  # the hand-back did not count
            assert job_objects(s, handed) == expected_objects(s, handed) and len(job_objects(s, handed)) == 12
        _nothing_left(s)
    finally:
        s.stop()


def test_webhook_receivers_cannot_hold_a_worker(tmp_path, redis_url, s3_url, broker):
    s = ServiceStack(
        tmp_path,
        redis_url,
        s3_url,
        broker=broker,
        STEMS_WEBHOOK_TIMEOUT_S="3",
        STEMS_WEBHOOK_ATTEMPTS="2",
        STEMS_WEBHOOK_BACKOFF_S="0.2",
        **FAST,
    )
    slow, endless = Server(trickle_headers), Server(endless_body)
    try:
        s.start_api()
        s.start_worker("cpu", "w")
        with s.client() as c:
            audio_id = upload(c, write_audio(tmp_path / "a.wav", tone_mix(2.0, SR), SR))["audio_id"]
            body = {"preset": "phantom_center", "audio_id": audio_id, "hq_streaming_format": "none"}
            t0 = time.monotonic()
            for server in (slow, endless):
                r = c.post("/create-stems", json={**body, "callback_url": f"http://127.0.0.1:{server.port}/hook"})
                assert (
                    wait_for(c, f"/status/stem_split/{r.json()['creation_id']}", TERMINAL, 60)["status"] == "complete"
                )
            plain = c.post("/create-stems", json=body).json()["creation_id"]
            assert wait_for(c, f"/status/stem_split/{plain}", TERMINAL, 60)["status"] == "complete"
            # two tries of at most 3 s at the trickling receiver, one quick one at the endless body: the one worker
            # was free again within seconds
            assert time.monotonic() - t0 < 45
            deadline = time.monotonic() + 20
            while (slow.connections, endless.connections) != (2, 1) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)
            assert (slow.connections, endless.connections) == (2, 1)  # STEMS_WEBHOOK_ATTEMPTS=2; 200 is final
        _nothing_left(s, ("cpu",))
    finally:
        s.stop()
        slow.close()
        endless.close()


def test_imports_are_bounded_in_time_and_tries(tmp_path, redis_url, s3_url, broker):
    web = WebServer()
    s = ServiceStack(
        tmp_path,
        redis_url,
        s3_url,
        broker=broker,
        STEMS_IMPORT_TIME_LIMIT_S="3",
        STEMS_TIME_LIMIT_GRACE_S="2",
        STEMS_TASK_MAX_ATTEMPTS="2",
        STEMS_LINK_TIMEOUT_S="600",
        **FAST,
    )
    try:
        data = write_audio(tmp_path / "a.wav", tone_mix(8.0, SR), SR).read_bytes()
        web.files["/slow.wav"] = web.files["/killer.wav"] = data
        web.slow["/slow.wav"], web.slow["/killer.wav"] = 1.0, 0.2  # about 20 s and 4 s for the file
        s.start_api()
        worker = s.start_worker("cpu", "w")
        with s.client() as c:
            slow = c.post("/from-link", json={"url": web.url("/slow.wav")}).json()["audio_id"]
            status = wait_for(c, f"/status/audio/{slow}", {"complete", "failed"}, 60)
            assert status["status"] == "failed" and status["error"]["code"] == "time_limit", status
            # an import whose worker process dies every time (OOM) is refused after the tries allowed
            killer = c.post("/from-link", json={"url": web.url("/killer.wav")}).json()["audio_id"]
            for tries in (1, 2):
                deadline = time.monotonic() + 60
                while s.store.tries("import", killer) < tries:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                time.sleep(0.3)
                for child in child_pids(worker.pid):
                    os.kill(child, signal.SIGKILL)
            status = wait_for(c, f"/status/audio/{killer}", {"complete", "failed"}, 60)
            assert status["status"] == "failed" and status["error"]["code"] == "too_many_attempts", status
            ok = upload(c, write_audio(tmp_path / "b.wav", tone_mix(1.0, SR), SR))  # the worker serves on
            assert ok["status"] == "complete"
        _nothing_left(s, ("cpu",))
    finally:
        s.stop()
        web.close()
