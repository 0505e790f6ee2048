"""Schema fuzzing: every operation of the served OpenAPI document, called with a valid key and
generated (valid and invalid) inputs, answers without a 5xx; the Range header of downloads too;
every URL field (found in the document by its `uri` format) with URL-shaped strings, which random
strings almost never are; and every parameter and body field of every route with hostile values
of its type.

Generated ids are random UUIDs and preset names random strings, which only ever meet a 404 or
422; so about half of the ids are swapped for ids that exist (an imported audio, a split and
its stems, owned by the fuzzing key) and most presets for real ones, and the handlers behind
the lookups are fuzzed as well.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis import GenerationMode

from tests.support import ServiceStack, tone_mix, upload, wait_for, write_audio

SR = 44100
FUZZ = settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory, redis_url, s3_url):
    s = ServiceStack(
        tmp_path_factory.mktemp("fuzz"),
        redis_url,
        s3_url,
        STEMS_RATE_LIMIT_PER_MINUTE="1000000",
        STEMS_MAX_ACTIVE_JOBS="1000",
    )
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
    return {
        "key": key,
        "audio_id": asset["audio_id"],
        "creation_id": job["creation_id"],
        "stem_id": stem,
        "mastered_id": mastered,
        "status": status,
    }


@pytest.fixture(scope="module")
def api_schema(fuzz_stack):
    return schemathesis.openapi.from_url(fuzz_stack.base + "/openapi.json")


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every route, known at collection time without a running server."""
    from api import routes_audio, routes_batch, routes_downloads, routes_master, routes_meta, routes_peaks, routes_stems

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
            f"{case.as_curl_command()}"
        )

    run()
    assert seen  # at least one call went out (operations without inputs have one case)


@FUZZ
@given(
    st.one_of(
        st.builds(
            lambda a, b: f"bytes={a}-{b}",
            st.one_of(st.just(""), st.integers(0, 2**70).map(str)),
            st.one_of(st.just(""), st.integers(0, 2**70).map(str)),
        ),
        # any printable header value an HTTP client can send (no leading/trailing blanks: h11 refuses them)
        st.from_regex(r"\A[ -~]{0,40}\Z").map(str.strip),
    )
)
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
            assert r.content == full[first : last + 1] and int(r.headers["content-length"]) == last - first + 1
        else:
            assert r.headers["content-range"] == f"bytes */{len(full)}"


_FULL: dict[str, bytes] = {}


def _full(c: httpx.Client, path: str) -> bytes:
    if path not in _FULL:
        _FULL[path] = c.get(path).raise_for_status().content
    return _FULL[path]


# -- URL fields ----------------------------------------------------------------------------------
# URL-shaped strings: what urlsplit() and .port raise ValueError for (brackets, ports), blanks and control
# characters, IDNA names valid and not, addresses inside and outside the public ranges, other schemes

SCHEMES = st.sampled_from(["http", "https", "HTTP", "hTTpS", "ftp", "file", "javascript", "gopher", "", "http:"])
HOSTS = st.one_of(
    st.sampled_from(
        [
            "localhost",
            "127.0.0.1",
            "example.com",
            "[::1]",
            "[fec0::1]",
            "[::ffff:10.0.0.1]",
            "[64:ff9b::7f00:1]",
            "2130706433",
            "0x7f000001",
            "[",
            "]",
            "[::1",
            "::1]",
            "[abc]",
            "[v1.x]",
            "[fe80::1%25eth0]",
            "[::1]]",
            "xn--",
            "xn--bcher-kva.example",
            "b\u00fccher.example",
            "\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",
            "a..b",
            ".",
            "",
            "@",
            "user:pw@localhost",
            ":@localhost",
            "%00",
            "a" * 64 + ".example",
            "\u200b.example",
            "\u2135.example",
            "xn--a-ecp.ru",
            "\ufb01.example",
            "local\x00host",
            "local\thost",
            "local host",
        ]
    ),
    st.from_regex(r"\A[a-z0-9-]{1,20}(\.[a-z0-9-]{1,10}){0,3}\Z"),
    st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
    st.text(min_size=1, max_size=20),  # any characters, controls included
)
PORTS = st.one_of(
    st.just(""),
    st.integers(-5, 70000).map(lambda p: f":{p}"),
    st.sampled_from([":", ":0", ":65535", ":65536", ":" + "9" * 30, ":x", ": 80", ":80a", ":+80", ":\u0668\u0660"]),
)
PATHS = st.one_of(
    st.sampled_from(["", "/", "/a.wav", "/\x00", "/\r\nHost: evil", "/%ZZ", "?q=\x7f", "#frag", "/../..", "\\evil"]),
    st.text(max_size=20).map(lambda t: "/" + t),
)
URLS = st.one_of(
    st.builds(lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}", SCHEMES, HOSTS, PORTS, PATHS),
    st.text(max_size=60),
)
# a body that passes everything but the URL field, per route; a route not named here gets only the field
URL_BODIES = {
    "/create-stems": lambda known: {
        "preset": "phantom_center",
        "audio_id": known["audio_id"],
        "hq_streaming_format": "none",
    },
    "/from-link": lambda known: {"url": "http://localhost:9/a.wav"},
}


def _resolve(schema: dict, doc: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _json_body(op: dict, doc: dict) -> dict:
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    return _resolve(schema, doc) if schema else {}


def _url_fields() -> list[tuple[str, str, str]]:
    """(method, path, field) of every URL field of the API's own OpenAPI document: format `uri`, or named so."""
    from api.app import create_app

    doc = create_app().openapi()
    found = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for name, prop in _json_body(op, doc).get("properties", {}).items():
                if name.endswith(("url", "uri")) or any(
                    _resolve(s, doc).get("format") == "uri" for s in [prop, *prop.get("anyOf", [])]
                ):
                    found.append((method.upper(), path, name))
    return sorted(found)


def test_every_url_field_is_fuzzed():
    """The URL fields the fuzzing below finds: all of them, so a new one is fuzzed without asking."""
    assert set(_url_fields()) >= {
        ("POST", "/from-link", "url"),
        ("POST", "/from-link", "callback_url"),
        ("POST", "/create-stems", "callback_url"),
    }


@pytest.mark.parametrize("method,path,field", _url_fields(), ids=lambda v: v)
def test_url_fields_answer_4xx_never_5xx(fuzz_stack, known, method, path, field):
    seen: dict[int, int] = {}

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(url=URLS)
    def run(url: str) -> None:
        body = {**URL_BODIES.get(path, lambda k: {})(known), field: url}
        with httpx.Client(base_url=fuzz_stack.base, headers={"x-api-key": known["key"]}, timeout=60) as c:
            r = c.request(method, path, json=body)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (url, r.status_code, r.text[:300])
        if r.status_code == 422 and r.json().get("code") == "invalid_link":
            assert r.json().get("field", field) == field, r.text  # a URL the schema refused is named

    run()
    assert 422 in seen, seen  # the strategies reach refusals ...


# -- every route, hostile values of each input's type ------------------------------------------------

_ID = str(uuid.uuid4())
HOSTILE = {
    "string": [
        "",
        " ",
        "\x00",
        "\x00" * 50,
        "a" * 5000,
        "../../etc/passwd",
        "%00",
        "%",
        "' OR '1'='1",
        "\u202e\ufeff",
        "\U0001f600" * 200,
        "{}",
        "null",
        "\r\n",
        "\ud7ff\ue000",
    ],
    "integer": [-1, 0, 2**63, 2**70, -(2**70), "1e400", "NaN", "", "0x10", 1.5, True, None, [], {}],
    "number": ["NaN", "Infinity", "-Infinity", 1e308, -1e308, 2**70, "", None, [], {}, True],
    "boolean": ["yes", 2, "", None, []],
    "uuid": [
        "not-a-uuid",
        "00000000-0000-0000-0000-000000000000",
        "{" + _ID + "}",
        _ID.upper(),
        _ID + "/..",
        _ID.replace("-", ""),
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "",
        7,
        None,
        [],
        {},
    ],
    "array": [[], [None] * 300, "x", [[[]]], {}, None, list(range(1000))],
    "object": [{}, [], "x", None, 5, {"start": "NaN", "end": 1e308}],
}
HOSTILE_BODIES = [
    "",
    "not json",
    "[]",
    "null",
    "1e400",
    "[" * 5000 + "]" * 5000,
    '{"a":' * 5000 + "1" + "}" * 5000,
    '{"preset": "\ud800"}',
    "\xff\xfe",
    '{"x": 1, "x": 2}',
]


def _kind(schema: dict, doc: dict) -> str:
    schema = _resolve(schema, doc)
    options = [_resolve(s, doc) for s in schema.get("anyOf", [schema]) if _resolve(s, doc).get("type") != "null"]
    first = options[0] if options else {}
    if first.get("format") == "uuid":
        return "uuid"
    return first.get("type") if first.get("type") in HOSTILE else "string"


def _walk() -> list[tuple[str, str, str, str, object]]:
    """(method, path, where, name, hostile value) for every input of every operation of the document."""
    from api.app import create_app

    doc = create_app().openapi()
    cases = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                values = HOSTILE[_kind(p.get("schema", {}), doc)]
                if p["in"] == "header":  # what an HTTP client can send in a header at all
                    values = [v for v in HOSTILE["string"] if v.isprintable() and v == v.strip() and v.isascii()]
                cases += [(method.upper(), path, p["in"], p["name"], v) for v in values]
            for name, prop in _json_body(op, doc).get("properties", {}).items():
                cases += [(method.upper(), path, "body", name, v) for v in HOSTILE[_kind(prop, doc)]]
            if "requestBody" in op:
                cases += [(method.upper(), path, "raw", "", v) for v in HOSTILE_BODIES]
    return cases


def _call(c: httpx.Client, known: dict, method: str, path: str, where: str, name: str, value) -> httpx.Response:
    params = {k: known.get(k, _ID) for k in ("audio_id", "creation_id", "stem_id")}
    url, query, headers, body, raw = path, {}, {}, None, None
    for k in ("audio_id", "creation_id", "stem_id"):
        url = url.replace(
            "{" + k + "}",
            params[k]
            if not (where == "path" and name == k)
            else quote(value if isinstance(value, str) else json.dumps(value), safe=""),
        )
    if where == "query":
        query[name] = value if isinstance(value, str) else json.dumps(value)
    elif where == "header":
        headers[name] = value
    elif where == "body":
        body = {**URL_BODIES.get(path, lambda k: {})(known), name: value}
    elif where == "raw":
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    if method in ("POST", "PUT", "PATCH") and body is None and raw is None:
        body = URL_BODIES.get(path, lambda k: {})(known)
    if raw is not None:
        return c.request(
            method, url, params=query, headers={**headers, "content-type": "application/json"}, content=raw
        )
    return c.request(method, url, params=query, headers=headers, json=body)


def test_every_route_with_hostile_values_of_each_inputs_type(fuzz_stack, known):
    """Every parameter and body field of every operation of the served document, given hostile values of its
    type (and every body, hostile JSON): a 4xx or a success, never a 5xx. DELETEs get ids that do not exist."""
    failures = []
    cases = _walk()
    assert len(cases) > 300, len(cases)
    ids = {**known, **{k: str(uuid.uuid4()) for k in ("audio_id", "creation_id", "stem_id")}}
    with httpx.Client(base_url=fuzz_stack.base, headers={"x-api-key": known["key"]}, timeout=60) as c:
        for method, path, where, name, value in cases:
            try:
                r = _call(c, ids if method == "DELETE" else known, method, path, where, name, value)
            except httpx.TransportError as exc:  # the server dropped the connection: as bad as a 500
                failures.append((method, path, where, name, repr(value)[:60], exc.__class__.__name__, str(exc)))
                continue
            if r.status_code >= 500:
                failures.append((method, path, where, name, repr(value)[:60], r.status_code, r.text[:200]))
    assert not failures, "\n".join(map(str, failures[:40]))
