"""The Python client and `stems remote split` against the live stack (API, Redis, S3, worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import soundfile as sf

from api.schemas import AudioStatus, Peaks, SplitStatus, StemsQueued
from stems.client import ApiError, Client, JobFailed
from tests.support import ROOT, tone_mix, write_audio

SR = 44100


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("song") / "song.flac", tone_mix(4.0, SR), SR, "PCM_24", "FLAC")


def test_upload_split_wait_and_download(stack, song, tmp_path):
    key = stack.store.create_key("client")
    sent = []
    with Client(stack.base, key) as client:
        accepted = client.upload(song, progress=lambda done, total: sent.append((done, total)))
        size = song.stat().st_size
        assert sent and sent[-1] == (size, size) and [d for d, _ in sent] == sorted(d for d, _ in sent)
        audio = client.wait_audio(accepted.audio_id)
        assert isinstance(audio, AudioStatus) and audio.filename == "song.flac" and audio.duration == pytest.approx(4.0)

        queued = client.create_stems(
            preset="phantom_center",
            audio_id=audio.audio_id,
            selection={"start": 1.0, "end": 3.0},
            bit_depth=16,
            hq_streaming_format="flac",
        )
        assert isinstance(queued, StemsQueued) and [s.name for s in queued.audio_stems] == ["centre", "sides"]
        seen = []
        done = client.wait(queued.creation_id, progress=lambda s: seen.append(s.status))
        assert isinstance(done, SplitStatus) and done.status == "complete" and seen[-1] == "complete"

        centre = done.stems[0]
        whole = client.download_stem(centre.stem_id, tmp_path / "centre.wav")
        info = sf.info(whole)
        assert (info.frames, info.samplerate, info.subtype) == (2 * SR, SR, "PCM_16")
        assert whole.stat().st_size == centre.size and not (tmp_path / "centre.wav.part").exists()

        # resume: a .part left by an interrupted download is continued with a Range request; its
        # first bytes are kept as they are (zeroed here, to show they were not fetched again)
        expected = whole.read_bytes()
        resumed = tmp_path / "again" / "centre.wav"
        resumed.parent.mkdir()
        (resumed.parent / "centre.wav.part").write_bytes(b"\0" * 1000)
        client.download_stem(centre.stem_id, resumed)
        assert resumed.read_bytes() == b"\0" * 1000 + expected[1000:]
        (resumed.parent / "whole.wav.part").write_bytes(expected)  # already whole: the server says 416
        assert client.download_stem(centre.stem_id, resumed.parent / "whole.wav").read_bytes() == expected

        hq = client.download_stem(done.stems[1].stem_id, tmp_path / "sides.flac", format="hq")
        assert sf.info(hq).format == "FLAC"
        archive = client.download_archive(tmp_path / "all.zip", creation_id=done.creation_id)
        with zipfile.ZipFile(archive) as zf:
            assert sorted(zf.namelist()) == ["centre.wav", "sides.wav"]
        peaks = client.stem_peaks(centre.stem_id)
        assert isinstance(peaks, Peaks) and peaks.channels == 2 and peaks.length > 0
        assert isinstance(client.audio_peaks(audio.audio_id), Peaks)
        assert done.creation_id in [s.creation_id for s in client.iter_splits(page_size=1)]


def test_errors_carry_the_api_code_and_message(stack, song, tmp_path):
    with Client(stack.base, "stk_wrong") as stranger:
        with pytest.raises(ApiError) as e:
            stranger.presets()
        assert (e.value.status, e.value.code, e.value.message) == (401, "unauthorized", "unknown API key")
    key = stack.store.create_key("client-errors")
    with Client(stack.base, key) as client:
        audio = client.wait_audio(client.upload(song).audio_id)
        with pytest.raises(ApiError) as e:
            client.create_stems(preset="4_tracks", audio_id=audio.audio_id)
        assert (
            e.value.status == 422
            and e.value.code == "invalid_preset"
            and "htdemucs" in e.value.fields["missing_models"]
        )
        assert "not available on this deployment" in e.value.message
        with pytest.raises(ApiError) as e:
            client.create_stems(preset="phantom_center", audio_id="not-a-uuid")
        assert e.value.status == 422 and e.value.code == "invalid_request" and e.value.message.startswith("audio_id:")
        with pytest.raises(ApiError) as e:
            client.status("00000000-0000-4000-8000-000000000000")
        assert e.value.code == "not_found"
        not_audio = tmp_path / "notes.wav"
        not_audio.write_text("these are not samples")
        with pytest.raises(JobFailed) as e:
            client.wait_audio(client.upload(not_audio).audio_id)
        assert e.value.code == "invalid_audio" and e.value.status.status == "failed"


class _Throttled(BaseHTTPRequestHandler):
    """A loopback server that first answers a status poll the way the API answers over its rate
    limit (429, Retry-After, JSON error), then with a finished split."""

    hits: list[float] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.hits.append(time.monotonic())
        if len(self.hits) == 1:
            body, status, headers = (
                {"detail": "more than 600 requests a minute", "code": "rate_limited", "retry_after": 1},
                429,
                {"Retry-After": "1"},
            )
        else:
            body, status, headers = (
                {
                    "creation_id": "c",
                    "audio_id": "a",
                    "preset": "phantom_center",
                    "status": "complete",
                    "progress": 1.0,
                    "stage": "complete",
                    "error": None,
                    "attempts": 1,
                    "models": {},
                    "stems": [],
                    "upscaled_audios": [],
                    "created_at": 0.0,
                    "started_at": 0.0,
                    "finished_at": 1.0,
                },
                200,
                {},
            )
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def test_wait_honours_retry_after():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Throttled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{server.server_address[1]}", "k") as client:
            status = client.wait("c")
        assert status.status == "complete"
        first, second = _Throttled.hits
        assert second - first >= 1.0  # waited as long as Retry-After said, not the poll's 0.25 s
    finally:
        server.shutdown()
        server.server_close()


def test_remote_split_cli(stack, song, tmp_path):
    key = stack.store.create_key("cli")
    env = {**os.environ, "STEMS_SERVER": stack.base, "STEMS_API_KEY": key, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "stems"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "remote",
            "split",
            str(song),
            "--preset",
            "phantom_center",
            "--out",
            str(out),
            "--selection",
            "0.5:2.5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [(p, m) for p, m in lines] == [
        (str(out / "centre.wav"), "dsp.centre"),
        (str(out / "sides.wav"), "dsp.centre"),
    ]
    for path, _ in lines:
        assert sf.info(path).frames == 2 * SR
    assert "upload" in done.stderr and "100%" in done.stderr  # the progress bars

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "stems.cli",
            "remote",
            "split",
            str(song),
            "--preset",
            "phantom_center",
            "--out",
            str(out),
            "--key",
            "stk_wrong",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown API key (unauthorized)" in bad.stderr
    unavailable = subprocess.run(
        [sys.executable, "-m", "stems.cli", "remote", "split", str(song), "--preset", "4_tracks", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unavailable.returncode == 2 and "htdemucs" in unavailable.stderr


def _readme_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    part = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [b.split("\n", 1)[1] for b in part.split("```")[1::2] if b.startswith("python\n")]


def test_the_readme_examples_run_as_written(stack, song, tmp_path):
    """The README's client example and its plain `requests` example, run against the stack."""
    blocks = _readme_blocks("Python client")
    assert len(blocks) == 2
    key = stack.store.create_key("readme")
    (tmp_path / "song.flac").write_bytes(song.read_bytes())
    env = {**os.environ, "STEMS_SERVER": stack.base, "STEMS_API_KEY": key, "PYTHONPATH": str(ROOT)}
    for code in blocks:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["centre.wav", "sides.wav"]
    assert json.loads(done.stdout.splitlines()[-1])["status"] == "processing"  # the requests example's answer
