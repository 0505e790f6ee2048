"""API contract: auth, ownership, validation, the catalogue and the OpenAPI document."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.support import tone_mix, upload, write_audio

SR = 44100


@pytest.fixture(scope="module")
def imported(stack, tmp_path_factory):
    path = write_audio(tmp_path_factory.mktemp("a") / "a.wav", tone_mix(3.0, SR), SR)
    c = stack.client("owner")
    asset = upload(c, path)
    assert asset["status"] == "complete"
    return c, asset


def test_health_needs_no_key(stack):
    assert httpx.get(stack.base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(stack.base + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok", "broker": "ok"}


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "stk_wrong"}])
def test_missing_or_unknown_key_is_401(stack, headers):
    for method, path in (("GET", "/presets"), ("POST", "/create-stems"), ("GET", f"/status/audio/{uuid.uuid4()}")):
        r = httpx.request(method, stack.base + path, headers=headers, json={})
        assert r.status_code == 401, (path, r.text)


def test_other_users_ids_are_404(stack, imported):
    _, asset = imported
    with stack.client("mallory") as m:
        assert m.get(f"/status/audio/{asset['audio_id']}").status_code == 404
        r = m.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]})
        assert r.status_code == 404
        assert m.get(f"/status/stem_split/{uuid.uuid4()}").status_code == 404
        assert m.get(f"/download/stem/{uuid.uuid4()}").status_code == 404


@pytest.mark.parametrize(
    "body,field",
    [
        ({"preset": "phantom_center", "audio_id": "X", "colour": "red"}, "colour"),
        ({"preset": "phantom_center", "audio_id": "not-a-uuid"}, "audio_id"),
        ({"preset": "phantom_center", "audio_id": "X", "bit_depth": 20}, "bit_depth"),
        ({"preset": "phantom_center", "audio_id": "X", "hq_streaming_format": "wma"}, "hq_streaming_format"),
        ({"preset": "phantom_center", "audio_id": "X", "selection": {"start": 2, "end": 1}}, "selection"),
        ({"preset": "phantom_center", "audio_id": "X", "selection": {"start": -1, "end": 1}}, "start"),
        ({"audio_id": "X"}, "preset"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(stack, imported, body, field):
    c, asset = imported
    body = {k: (asset["audio_id"] if v == "X" else v) for k, v in body.items()}
    r = c.post("/create-stems", json=body)
    assert r.status_code == 422, r.text
    assert field in r.text


def test_semantic_refusals(stack, imported):
    c, asset = imported
    aid = asset["audio_id"]
    cases = [
        ({"preset": "no_such_preset", "audio_id": aid}, 422, "unknown preset"),
        ({"preset": "phantom_center"}, 422, "audio_id"),
        ({"preset": "phantom_center", "audio_id": aid, "selection": {"start": 1, "end": 30}}, 422, "after the end"),
        ({"preset": "phantom_center", "audio_id": str(uuid.uuid4())}, 404, "not found"),
        ({"preset": "phantom_center", "stem_id": str(uuid.uuid4()), "audio_id": aid}, 404, "not found"),
        ({"preset": "6_tracks", "audio_id": aid}, 422, "htdemucs_6s"),
        ({"preset": "custom", "audio_id": aid, "prompt": "x" * 5000}, 422, "prompt"),
        ({"preset": "custom", "audio_id": aid, "prompt": "the sound of a theremin"}, 422, "prompt"),
        ({"preset": "custom", "audio_id": aid, "prompt": "lead vocal", "stereo_mode": "quad"}, 422, "stereo_mode"),
        ({"preset": "phantom_center", "audio_id": aid, "restoration_params": {"preset": "nope"}}, 422, "restoration"),
    ]
    for body, status, text in cases:
        r = c.post("/create-stems", json=body)
        assert r.status_code == status, (body, r.text)
        assert text in r.text, (body, r.text)


def test_custom_fields_are_ignored_for_other_presets(stack, imported):
    c, asset = imported
    r = c.post(
        "/create-stems",
        json={
            "preset": "phantom_center",
            "audio_id": asset["audio_id"],
            "stereo_mode": "quad",
            "spans": "whatever",
            "prompt": 42,
        },
    )
    assert r.status_code == 200, r.text


def test_source_must_finish_importing(stack, tmp_path):
    with stack.client() as c:
        path = write_audio(tmp_path / "x.wav", tone_mix(1.0, SR), SR)
        with open(path, "rb") as f:
            audio_id = c.post("/from-file", files={"file": ("x.wav", f)}).json()["audio_id"]
        assert stack.store.update_asset(stack.store.get_asset(audio_id).model_copy(update={"status": "processing"}))
        r = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": audio_id})
        assert r.status_code == 409 and "finished importing" in r.text


def test_presets_listing(stack):
    with stack.client() as c:
        presets = {p["name"]: p for p in c.get("/presets").json()["presets"]}
    assert presets["phantom_center"]["available"] and presets["phantom_center"]["stems"] == ["centre", "sides"]
    assert presets["phantom_center"]["queue"] == "cpu"
    assert not presets["6_tracks"]["available"] and presets["6_tracks"]["missing_models"] == ["htdemucs_6s"]
    # what makes a preset available: the best chain's pull, or how to get weights that cannot be pulled
    assert presets["6_tracks"]["install_hint"] == "stems models pull htdemucs_6s"
    assert presets["4_tracks"]["install_hint"] == "stems models pull bs_roformer_4stem"
    assert presets["duet"]["install_hint"].startswith(
        "stems models pull bs_roformer_viperx_1297; mdx_duet: No public release"
    )
    assert presets["phantom_center"]["install_hint"] is None
    assert presets["mvsep_mega_53"]["usage_multiplier"] == 3
    assert len(presets) == 25


def test_openapi_describes_the_api(stack):
    doc = httpx.get(stack.base + "/openapi.json").json()
    for path in (
        "/from-file",
        "/from-link",
        "/from-storage",
        "/create-stems",
        "/status/audio/{audio_id}",
        "/status/stem_split/{creation_id}",
        "/download/stem/{stem_id}",
        "/download-archive",
        "/presets",
        "/healthz",
        "/readyz",
        "/cancel/{creation_id}",
        "/usage",
        "/master-audio",
        "/status/mastered/{mastered_id}",
        "/download/mastered/{mastered_id}",
        "/mastered/{mastered_id}",
        "/create-stems/batch",
    ):
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    # the new fields and answers (#22): mastering, dry runs and eta_s, batches
    assert set(schemas["MasterAudio"]["properties"]) == {
        "audio_id",
        "stem_id",
        "upscaled_id",
        "mastered_id",
        "preset",
        "bit_depth",
    }
    assert schemas["MasterAudio"]["properties"]["preset"]["enum"] == ["streaming", "loud", "podcast"]
    assert {"integrated_lufs", "true_peak_dbtp", "loudness_range_lu"} <= set(schemas["Loudness"]["properties"])
    assert {"measured", "target", "download"} <= set(schemas["MasterStatus"]["properties"])
    assert {"dry_run", "mastered_id"} <= set(schemas["CreateStems"]["properties"])
    assert "eta_s" in schemas["SplitStatus"]["properties"]
    assert {"chain", "queue", "usage_minutes", "estimated_output_bytes", "eta_s", "eta_basis"} <= set(
        schemas["StemsEstimate"]["properties"]
    )
    created = doc["paths"]["/create-stems"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {r["$ref"].rsplit("/", 1)[1] for r in created["anyOf"]} == {"StemsQueued", "StemsEstimate"}
    assert schemas["CreateStemsBatch"]["properties"]["items"]["maxItems"] == 100
    batch = doc["paths"]["/create-stems/batch"]["post"]
    assert any(p["name"].lower() == "idempotency-key" for p in batch["parameters"])
    assert doc["paths"]["/download/mastered/{mastered_id}"]["get"]["responses"]["200"]["content"]["audio/wav"] == {}
    assert "multipart/form-data" in doc["paths"]["/from-file"]["post"]["requestBody"]["content"]
    assert doc["components"]["schemas"]["CreateStems"]["examples"]
    assert (
        "stems models pull" in doc["components"]["schemas"]["PresetInfo"]["properties"]["install_hint"]["description"]
    )
