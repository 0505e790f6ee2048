"""Bad input: a clear refusal with a reason, nothing kept in storage, and the stack keeps serving."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
import soundfile as sf

from stems import rediskeys as K
from tests.support import tone_mix, upload, wait_for, write_audio


def _user() -> str:
    """A user of this test alone: the shared stack runs other tests' jobs, whose stems may still be landing."""
    return f"bad-{uuid.uuid4().hex[:12]}"


def _objects(stack, user: str) -> list[str]:
    """What storage holds for `user`: all a request of that user could have made."""
    return stack.objects(f"users/{user}/")


def _audio_records(stack, user: str) -> set[str]:
    """The ids of `user`'s audio records (other tests' records are not ours to count)."""
    return {a.id for a in stack.store.get_assets(stack.store.ids(K.AUDIO)) if a and a.user_id == user}


def _bytes(audio: np.ndarray, sr: int, subtype: str = "PCM_16", format: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.T, sr, subtype=subtype, format=format)
    return buf.getvalue()


def _post(c, data: bytes, name: str = "x.wav"):
    return c.post("/from-file", files={"file": (name, data)})


def test_empty_upload_is_422(stack):
    user = _user()
    with stack.client(user) as c:
        r = _post(c, b"")
        assert r.status_code == 422 and "empty" in r.text
        assert _objects(stack, user) == [] and _audio_records(stack, user) == set()


def test_no_file_field_is_422(stack):
    with stack.client() as c:
        assert c.post("/from-file", files={"other": ("x", b"123")}).status_code == 422
        assert c.post("/from-file", content=b"raw", headers={"content-type": "audio/wav"}).status_code == 422


def test_oversized_upload_is_413_while_streaming(tmp_path_factory, redis_url, s3_url):
    from tests.support import ServiceStack

    s = ServiceStack(tmp_path_factory.mktemp("small"), redis_url, s3_url, STEMS_MAX_UPLOAD_BYTES="100000")
    s.start_api()
    try:
        with s.client() as c:

            def body():  # a chunked body without Content-Length: the limit must be found while streaming
                yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
                for _ in range(50):
                    yield b"\0" * 10000
                yield b"\r\n--B--\r\n"

            r = c.post("/from-file", content=body(), headers={"content-type": "multipart/form-data; boundary=B"})
            assert r.status_code == 413, r.text
            r = _post(c, b"\0" * 200000)  # with Content-Length: refused before reading
            assert r.status_code == 413
            assert s.store.ids(K.AUDIO) == []
            assert c.get("/healthz").status_code == 200
    finally:
        s.stop()


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("notes.txt", b"these are not the droids you are looking for" * 100, "not a decodable audio file"),
        ("truncated.flac", None, "corrupt"),
        ("cut.wav", None, "truncated audio: the header promises 3.000 s"),
        ("cut.flac", None, "truncated audio: the header promises 3.000 s"),
        ("cut.aiff", None, "truncated audio: the header promises 3.000 s"),
        ("short.wav", None, "shortest"),
        ("zero.wav", None, "zero length"),
        ("nan.wav", None, "NaN"),
        ("long.wav", None, "maximum"),
        ("long.mp3", None, "maximum"),
    ],
)
def test_refused_audio_fails_import_with_reason_and_is_not_kept(stack, name, data, reason):
    sr = 8000
    if name == "truncated.flac":
        full = _bytes(tone_mix(3.0, 44100), 44100, "PCM_16", "FLAC")
        data = full[: len(full) // 3] + b"\xff" * 500 + full[len(full) // 2 : len(full) // 2 + 300]
    elif name == "cut.wav":  # a 200-byte WAV whose header promises 3 s (0.9 ms of audio is all it holds)
        data = _bytes(tone_mix(3.0, 44100), 44100, "PCM_16")[:200]
    elif name == "cut.flac":  # cut at a frame's sync code: every frame left decodes, STREAMINFO promises more
        full = _bytes(tone_mix(3.0, 44100), 44100, "PCM_16", "FLAC")
        data = full[: full.find(b"\xff\xf8", len(full) // 2)]
    elif name == "cut.aiff":
        full = _bytes(tone_mix(3.0, 44100), 44100, "PCM_16", "AIFF")
        data = full[: len(full) // 3]
    elif name == "short.wav":  # under STEMS_MIN_DURATION_S (0.5 s): too short for any model
        data = _bytes(tone_mix(0.2, 44100), 44100)
    elif name == "long.mp3":  # 11 min: the import stops decoding at the 10 min maximum
        data = _bytes(np.zeros((1, 8000 * 660), np.float32), sr, "MPEG_LAYER_III", "MP3")
    elif name == "zero.wav":
        data = _bytes(np.zeros((2, 0), np.float32), sr)
    elif name == "nan.wav":
        a = tone_mix(1.0, sr)
        a[0, 100] = np.nan
        a[1, 200] = np.inf
        data = _bytes(a, sr, "FLOAT")
    elif name == "long.wav":  # 11 min of 8 kHz mono 8-bit: over the test stack's 10 min maximum
        data = _bytes(np.zeros((1, 8000 * 660), np.float32), sr, "PCM_U8")
    with stack.client() as c:
        r = _post(c, data, name)
        assert r.status_code == 200, r.text
        status = wait_for(c, f"/status/audio/{r.json()['audio_id']}", {"complete", "failed"}, 120)
        assert status["status"] == "failed", status
        assert reason.lower() in status["error"]["message"].lower(), status["error"]
        key = stack.store.get_asset(status["audio_id"]).object_key
        assert stack.objects(key.rsplit("/", 1)[0] + "/") == []  # neither the original nor anything beside it
        # a refused source cannot be split: 409 with the reason
        r = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": status["audio_id"]})
        assert r.status_code == 409 and reason.lower() in r.text.lower()
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("sr,channels", [(8000, 1), (192000, 2), (48000, 8)])
def test_edge_formats_within_limits_are_split(stack, tmp_path, sr, channels):
    """8 kHz mono, 192 kHz and 8 channels are inside the documented limits: accepted and split correctly."""
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal((channels, sr * 2))).astype(np.float32)
    path = write_audio(tmp_path / "edge.wav", audio, sr, "PCM_24")
    with stack.client() as c:
        asset = upload(c, path)
        assert asset["status"] == "complete" and asset["sample_rate"] == sr and asset["channels"] == channels
        job = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": asset["audio_id"]}).json()
        status = wait_for(c, f"/status/stem_split/{job['creation_id']}", {"complete", "failed"})
        assert status["status"] == "complete", status
        for stem in status["stems"]:
            info = sf.info(io.BytesIO(c.get(stem["download"]["wav"]).content))
            assert info.samplerate == sr and info.frames == sr * 2
            assert info.channels == min(channels, 2)  # mono stays mono; more than two fold to stereo


def test_selection_and_spans_refused(stack, tmp_path):
    path = write_audio(tmp_path / "s.wav", tone_mix(2.0, 44100), 44100)
    with stack.client() as c:
        aid = upload(c, path)["audio_id"]
        for sel in (
            {"start": 1.5, "end": 1.0},
            {"start": -0.5, "end": 1.0},
            {"start": 0, "end": 2.5},
            {"start": 1, "end": 1},
            {"start": 0.5, "end": 0.6},
        ):  # the last: shorter than STEMS_MIN_DURATION_S
            r = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": aid, "selection": sel})
            assert r.status_code == 422, (sel, r.text)
        assert "shortest" in r.text
        r = c.post(
            "/create-stems",
            json={
                "preset": "custom",
                "audio_id": aid,
                "prompt": "drums",
                "selection": {"start": 0.5, "end": 1.5},
                "spans": [{"start": 0.1, "end": 1.0}],
            },
        )
        assert r.status_code == 422 and "outside the selection" in r.text
        r = c.post("/create-stems", json={"preset": "phantom_center", "stem_id": "123"})
        assert r.status_code == 422
        r = c.post("/create-stems", json={"preset": "phantom_center", "upscaled_id": aid})  # an audio id, wrong kind
        assert r.status_code == 404


def test_archive_of_unfinished_job_is_409(stack, tmp_path):
    path = write_audio(tmp_path / "s.wav", tone_mix(1.0, 44100), 44100)
    with stack.client() as c:
        aid = upload(c, path)["audio_id"]
        job = c.post("/create-stems", json={"preset": "phantom_center", "audio_id": aid}).json()
        c.post(f"/cancel/{job['creation_id']}")
        r = c.post("/download-archive", json={"creation_id": job["creation_id"]})
        assert r.status_code == 409
        r = c.post("/download-archive", json={"stem_ids": [job["audio_stems"][0]["stem_id"]]})
        assert r.status_code == 409
        r = c.post("/download-archive", json={"stem_ids": [str(uuid.uuid4())]})
        assert r.status_code == 404
        r = c.post("/download-archive", json={})
        assert r.status_code == 422


def _multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"B") -> bytes:
    """A multipart body from (headers, data) pairs, as a hostile client would hand-write it."""
    out = b""
    for headers, data in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


FILE = b'Content-Disposition: form-data; name="file"; filename="a.wav"'


@pytest.mark.parametrize(
    "case",
    [
        "many parts",
        "huge part header",
        "many part headers",
        "huge field",
        "long boundary",
        "no boundary",
        "garbage framing",
        "unterminated",
    ],
)
def test_hostile_multipart_is_4xx_and_keeps_nothing(stack, case):
    wav = _bytes(tone_mix(1.0, 8000), 8000)
    boundary = b"B"
    if case == "many parts":
        body = _multipart(
            [(b'Content-Disposition: form-data; name="f%d"' % i, b"x") for i in range(5000)] + [(FILE, wav)]
        )
    elif case == "huge part header":
        body = _multipart([(FILE + b"; junk=" + b"j" * 200_000, wav)])
    elif case == "many part headers":
        body = _multipart([(FILE + b"".join(b"\r\nX-H%d: v" % i for i in range(2000)), wav)])
    elif case == "huge field":
        body = _multipart([(b'Content-Disposition: form-data; name="note"', b"n" * 3_000_000), (FILE, wav)])
    elif case == "long boundary":
        boundary = b"b" * 5000
        body = _multipart([(FILE, wav)], boundary)
    elif case == "no boundary":
        boundary, body = b"", _multipart([(FILE, wav)])
    elif case == "garbage framing":
        body = b"--B\r\n" + b"\x00\xff" * 50_000
    else:
        body = b"--B\r\n" + FILE + b"\r\n\r\n" + wav  # never closed
    ctype = "multipart/form-data" + (f"; boundary={boundary.decode()}" if boundary else "")
    user = _user()
    with stack.client(user) as c:
        r = c.post("/from-file", content=body, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
        assert "code" in r.json(), r.text[:300]
        # no record and no object of it: the user is this test's own, so whatever it holds the request made
        assert _audio_records(stack, user) == set()
        assert _objects(stack, user) == []
        assert list((stack.tmp / "data" / "tmp").glob("upload-*")) == []  # no temporary file is left either
        assert c.get("/healthz").status_code == 200
        assert c.post("/from-file", files={"file": ("ok.wav", wav)}).status_code == 200  # and uploads still work


def test_oversized_json_bodies_are_413(stack):
    huge = b'{"preset": "phantom_center", "prompt": "' + b"x" * (2 << 20) + b'"}'
    with stack.client("hostile-json") as c:
        r = c.post("/create-stems", content=huge, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "too_large", r.text[:200]

        def chunks():  # no Content-Length: found while reading
            for i in range(0, len(huge), 65536):
                yield huge[i : i + 65536]

        r = c.post("/create-stems", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text[:200]
        assert (
            c.post("/create-stems", json={"preset": "phantom_center", "audio_id": str(uuid.uuid4())}).status_code == 404
        )
