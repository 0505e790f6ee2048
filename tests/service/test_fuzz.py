"""Schema fuzzing: every operation of the served OpenAPI document, called with a valid key and
generated (valid and invalid) inputs, answers without a 5xx; the Range header of downloads too.

Generated ids are random UUIDs and preset names random strings, which only ever meet a 404 or
422; so about half of the ids are swapped for ids that exist (an imported audio, a split and
its stems, owned by the fuzzing key) and most presets for real ones, and the handlers behind
the lookups are fuzzed as well.
"""
from __future__ import annotations

import uuid

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio

SR = 44100
FUZZ = settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory, redis_url, s3_url):
    s = ServiceStack(tmp_path_factory.mktemp("fuzz"), redis_url, s3_url, STEMS_RATE_LIMIT_PER_MINUTE="1000000",
                     STEMS_MAX_ACTIVE_JOBS="1000")
    s.start_api()
    s.start_worker("cpu", "fuzz")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def known(fuzz_stack, tmp_path_factory):
    """The fuzzing key and ids it owns: an imported audio and a split of it (complete when the preset runs)."""
    return _owned_split(fuzz_stack, tmp_path_factory)


@pytest.fixture(scope="module")
def disposable(fuzz_stack, tmp_path_factory):
    """Ids of their own for the DELETE operations, so the other operations keep theirs."""
    return _owned_split(fuzz_stack, tmp_path_factory)


def _owned_split(fuzz_stack, tmp_path_factory) -> dict:
    key = fuzz_stack.store.create_key("fuzzer")
    path = write_audio(tmp_path_factory.mktemp("fz") / "f.wav", tone_mix(2.0, SR), SR)
    with httpx.Client(base_url=fuzz_stack.base, headers={"x-api-key": key}, timeout=60) as c:
        asset = upload(c, path)
        assert asset["status"] == "complete", asset
        job = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]}).json()
        status = wait_for(c, f"/status/stem_split/{job['creation_id']}", {"complete", "failed"}, 120)
        mastered = c.post("/master-audio", json={"audio_id": asset["audio_id"]}).json()["mastered_id"]
        wait_for(c, f"/status/mastered/{mastered}", {"complete", "failed"}, 120)
    stem = status["stems"][0]["stem_id"] if status["stems"] else job["audio_stems"][0]["stem_id"]
    return {"key": key, "audio_id": asset["audio_id"], "creation_id": job["creation_id"], "stem_id": stem,
            "mastered_id": mastered, "status": status}


@pytest.fixture(scope="module")
def api_schema(fuzz_stack):
    return schemathesis.openapi.from_url(fuzz_stack.base + "/openapi.json")


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every route, known at collection time without a running server."""
    from api import (routes_audio, routes_batch, routes_downloads, routes_master, routes_meta, routes_peaks,
                     routes_stems)

    modules = (routes_audio, routes_stems, routes_batch, routes_master, routes_downloads, routes_peaks, routes_meta)
    return sorted((m, r.path) for mod in modules for r in mod.router.routes for m in r.methods if m != "HEAD")


def _swap(value, known: dict, name: str):
    """Half of the generated UUIDs (by their first digit) become ids that exist."""
    if isinstance(value, str) and value[:1] in "01234567" and name in known:
        try:
            uuid.UUID(value)
        except ValueError:
            return value
        return known[name]
    return value


def _use_known_ids(case, known: dict) -> None:
    for name, value in list((case.path_parameters or {}).items()):
        case.path_parameters[name] = _swap(value, known, name)
    if isinstance(case.body, dict):
        for name in ("audio_id", "creation_id", "stem_id", "mastered_id"):
            if name in case.body:
                case.body[name] = _swap(case.body[name], known, name)
        preset = case.body.get("preset")
        if isinstance(preset, str) and len(preset) % 3:  # two thirds: presets that exist, to get past the lookup
            case.body["preset"] = ("phantom_center", "custom")[len(preset) % 3 - 1]
        if isinstance(case.body.get("stem_ids"), list):
            case.body["stem_ids"] = [_swap(v, known, "stem_id") for v in case.body["stem_ids"]]


@pytest.mark.parametrize("method,path", _operations(), ids=lambda v: v)
def test_no_server_errors(api_schema, request, method, path):
    """The served schema's operation, positive and negative (schema-violating) cases: never a 5xx."""
    known = request.getfixturevalue("disposable" if method == "DELETE" else "known")
    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    seen: dict[int, int] = {}

    @FUZZ
    @given(case=cases)
    def run(case) -> None:
        _use_known_ids(case, known)
        case.headers = {**(case.headers or {}), "x-api-key": known["key"]}  # a valid key: reach the handlers
        response = case.call(timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
            f"{case.as_curl_command()}")

    run()
    assert seen  # at least one call went out (operations without inputs have one case)


@FUZZ
@given(st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.one_of(st.just(""), st.integers(0, 2 ** 70).map(str)),
              st.one_of(st.just(""), st.integers(0, 2 ** 70).map(str))),
    # any printable header value an HTTP client can send (no leading/trailing blanks: h11 refuses them)
    st.from_regex(r"\A[ -~]{0,40}\Z").map(str.strip),
))
def test_download_range_header(fuzz_stack, known, header):
    if known["status"]["status"] != "complete":
        pytest.skip(f"the split did not complete: {known['status']['error']}")
    with httpx.Client(base_url=fuzz_stack.base, headers={"x-api-key": known["key"]}, timeout=60) as c:
        path = f"/download/stem/{known['stem_id']}"
        full = _full(c, path)
        r = c.get(path, headers={"range": header})
        assert r.status_code in (200, 206, 416), (header, r.status_code, r.text[:200])
        if r.status_code == 200:
            assert r.content == full
        elif r.status_code == 206:
            first, last = map(int, r.headers["content-range"].split(" ")[1].split("/")[0].split("-"))
            assert r.content == full[first:last + 1] and int(r.headers["content-length"]) == last - first + 1
        else:
            assert r.headers["content-range"] == f"bytes */{len(full)}"


_FULL: dict[str, bytes] = {}


def _full(c: httpx.Client, path: str) -> bytes:
    if path not in _FULL:
        _FULL[path] = c.get(path).raise_for_status().content
    return _FULL[path]
