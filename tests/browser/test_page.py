"""The web page in a real browser (Debian's chromium through Playwright) against the real stack.

Each stage is saved as a screenshot in the test's tmp directory (and in $STEMS_SCREENSHOTS when
set: `STEMS_SCREENSHOTS=docs/screenshots pytest tests/browser` refreshes the README's pictures).
The page runs under its own Content-Security-Policy, so the checks read the page with
`page.evaluate` from Python rather than string predicates evaluated in the page.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import time
import zipfile

import httpx
import pytest

from tests.support import tone_mix, write_audio
from tests.webserver import WebServer

SR = 44100
SECONDS = 20.0  # a 10 s selection: still playing through the mixer checks on a slow machine
# the page's progress labels as they change, recorded from outside the page's own code
RECORD_LABELS = """
window.__labels = [];
addEventListener("DOMContentLoaded", () => new MutationObserver(() => {
  for (const el of document.querySelectorAll(".progress .label")) {
    if (el.textContent && window.__labels[window.__labels.length - 1] !== el.textContent) window.__labels.push(el.textContent);
  }
}).observe(document.body, { subtree: true, childList: true, characterData: true }));
"""


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("song") / "song.wav", tone_mix(SECONDS, SR), SR, "PCM_16")


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.add_init_script(RECORD_LABELS)
    page.problems = []  # uncaught errors and CSP refusals: none may happen
    page.on("pageerror", lambda e: page.problems.append(f"pageerror: {e}"))
    page.on(
        "console", lambda m: m.type == "error" and "Content Security Policy" in m.text and page.problems.append(m.text)
    )
    page.requests = []
    page.on("request", lambda r: page.requests.append((r.url, r.resource_type)))
    yield page
    context.close()


def until(page, script: str, arg=None, timeout: float = 60.0):
    """Poll `script` (a JS function of `arg`) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(script, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {script}")
        time.sleep(0.1)


def drop(page, selector: str, path) -> None:
    """Drag and drop a file onto `selector`, as a file dragged from the desktop arrives."""
    data = page.evaluate_handle(
        """([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "audio/wav" }));
        return dt;
    }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )
    page.dispatch_event(selector, "dragover", {"dataTransfer": data})
    page.dispatch_event(selector, "drop", {"dataTransfer": data})


def drawn_pixels(page, stem: str) -> int:
    """Non-transparent pixels on the canvases of a stem's waveform (inside wavesurfer's shadow DOM)."""
    return sum(
        c.evaluate("""(c) => {
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;
    }""")
        for c in page.locator(f".stem[data-stem={stem}] canvas").all()
    )


def audio_state(page) -> dict:
    return {
        s["stem"]: s
        for s in page.evaluate("""() => [...document.querySelectorAll(".stem")].map((row) => {
        const a = row.querySelector("audio");
        return { stem: row.dataset.stem, t: a.currentTime, paused: a.paused, muted: a.muted, volume: a.volume };
    })""")
    }


def test_upload_select_split_mix_and_download(stack, song, page, shots):
    key = stack.store.create_key("browser")
    api = httpx.Client(base_url=stack.base, headers={"x-api-key": key}, timeout=30)

    page.goto(f"{stack.base}/#key={key}")
    page.locator("#app").wait_for(state="visible")
    assert "#" not in page.url and key not in page.url  # the key left the address bar at once
    assert page.evaluate("() => localStorage.getItem('stems.apiKey')") == key
    page.locator("#presets .preset").first.wait_for()
    shots(page, "01-signed-in")

    drop(page, "#dropzone", song)
    page.locator("#source-waveform canvas").first.wait_for()
    assert "song.wav" in page.text_content("#source-name")
    assert any("uploading song.wav: 100%" in label for label in page.evaluate("() => window.__labels"))
    shots(page, "02-source-waveform")

    box = page.locator("#source-waveform").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 0.2 * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.7 * box["width"], y, steps=12)
    page.mouse.up()
    start, end = float(page.input_value("#sel-start")), float(page.input_value("#sel-end"))
    assert start == pytest.approx(0.2 * SECONDS, abs=0.15) and end == pytest.approx(0.7 * SECONDS, abs=0.15)

    page.check(".preset[data-preset=phantom_center] input")
    assert page.locator("#custom-fields").is_hidden()
    shots(page, "03-selection-and-preset")
    page.click("#split-button")
    page.locator("#job-section").wait_for(state="visible")
    shots(page, "04-progress")
    page.locator("#mixer").wait_for(state="visible", timeout=120_000)
    assert page.text_content("#job-stage") == "complete"
    assert any(label.endswith("%") for label in page.evaluate("() => window.__labels"))  # the job's progress bar

    job = api.get("/stem_split", params={"limit": 1}).json()["items"][0]
    assert job["preset"] == "phantom_center" and job["status"] == "complete"
    for stem in job["stems"]:  # the dragged selection is what was split
        assert stem["duration"] == pytest.approx(end - start, abs=1e-3)

    # one player per stem, each with a waveform drawn from the API's peaks
    page.locator(".stem[data-stem=sides] canvas").first.wait_for()
    assert sorted(audio_state(page)) == ["centre", "sides"]
    for name in ("centre", "sides"):
        assert drawn_pixels(page, name) > 1000, name
    urls = [(u.split(stack.base, 1)[-1], kind) for u, kind in page.requests]
    for stem in job["stems"]:
        assert (f"/stem/{stem['stem_id']}/peaks", "fetch") in urls
    # the stems are streamed by the media elements for playback, never fetched whole to draw them
    assert not [u for u, kind in urls if u.startswith("/download/stem") and kind in ("fetch", "xhr")]
    assert all(key not in u for u, _ in urls)  # the key never travels in a URL

    page.click("#play-button")
    until(page, """() => [...document.querySelectorAll(".stem audio")].every((a) => a.currentTime > 0.5)""", timeout=30)
    state = audio_state(page)  # the audio clock advances ...
    times = [s["t"] for s in state.values()]
    assert all(not s["paused"] for s in state.values()), state
    assert max(times) - min(times) < 0.15, state  # ... for every stem together
    assert not page.text_content("#clock").startswith("0:00.0")
    shots(page, "05-mixer-playing")

    page.click(".stem[data-stem=centre] .solo")
    state = audio_state(page)
    assert not state["centre"]["muted"] and state["sides"]["muted"]  # solo: only the soloed stem sounds
    shots(page, "06-solo-centre")
    page.click(".stem[data-stem=centre] .solo")
    page.click(".stem[data-stem=centre] .mute")
    page.locator(".stem[data-stem=sides] .volume").fill("0.25")
    state = audio_state(page)
    assert state["centre"]["muted"] and not state["sides"]["muted"]
    assert state["sides"]["volume"] == pytest.approx(0.25)
    page.click("#play-button")  # pause
    assert all(s["paused"] for s in audio_state(page).values())

    with page.expect_download() as download:
        page.click("#zip-button")
    with zipfile.ZipFile(io.BytesIO(open(download.value.path(), "rb").read())) as zf:
        assert sorted(zf.namelist()) == ["centre.wav", "sides.wav"]
        assert zf.read("centre.wav") == api.get(job["stems"][0]["download"]["wav"]).content
    with page.expect_download() as download:
        page.click(".stem[data-stem=sides] a.download-wav")
    assert open(download.value.path(), "rb").read() == api.get(job["stems"][1]["download"]["wav"]).content
    assert page.locator(f"#history tr[data-creation-id='{job['creation_id']}']").count() == 1
    assert page.problems == []


def test_a_bad_key_and_an_unavailable_preset_show_the_api_message(stack, song, page, shots):
    page.goto(stack.base + "/")
    assert page.locator("#app").is_hidden()
    page.fill("#key-input", "stk_not-a-key")
    page.click("#signin-button")
    page.locator("#signin-message").wait_for(state="visible")
    refusal = httpx.get(stack.base + "/presets", headers={"x-api-key": "stk_not-a-key"}).json()
    assert refusal["detail"] in page.text_content("#signin-message")  # "unknown API key"
    assert page.locator("#app").is_hidden()
    shots(page, "07-bad-key")

    key = stack.store.create_key("browser-errors")
    page.fill("#key-input", key)
    page.click("#signin-button")
    page.locator("#app").wait_for(state="visible")

    web = WebServer()  # import by link, from a loopback server the test stack allows
    try:
        web.files["/track/song.wav"] = song.read_bytes()
        page.fill("#link-input", web.url("/track/song.wav"))
        page.click("#link-form button")
        page.locator("#source-waveform canvas").first.wait_for()
    finally:
        web.close()
    audio_id = page.evaluate("() => window.stems.state.audio.audio_id")

    page.check(".preset[data-preset=custom] input")
    assert page.locator("#custom-fields").is_visible()  # custom-only fields for custom alone
    card = page.locator(".preset[data-preset='4_tracks']")
    assert "unavailable" in card.get_attribute("class") and "htdemucs" in card.locator(".why").text_content()
    # the command comes first, the rest on demand; what serves a preset says when it is a DSP fallback
    listed = {p["name"]: p for p in httpx.get(stack.base + "/presets", headers={"x-api-key": key}).json()["presets"]}
    assert card.locator(".why > code").text_content() == listed["4_tracks"]["install_command"]
    assert card.locator(".why details").get_attribute("open") is None
    served = page.locator(".preset[data-preset=phantom_center] .served").text_content()
    assert "DSP fallback" in served and "dsp.centre" in served
    page.check(".preset[data-preset='4_tracks'] input")
    assert page.locator("#custom-fields").is_hidden()
    page.click("#split-button")
    until(page, "() => document.querySelector('#split-message').textContent.includes('not available on this')")
    refusal = httpx.post(
        stack.base + "/create-stems", headers={"x-api-key": key}, json={"preset": "4_tracks", "audio_id": audio_id}
    ).json()
    assert f"{refusal['detail']} ({refusal['code']})" in page.text_content("#split-message")
    shots(page, "08-unavailable-preset")
    assert page.problems == []


def test_a_queued_split_can_be_cancelled(stack, song, page, shots):
    key = stack.store.create_key("browser-cancel")
    page.goto(f"{stack.base}/#key={key}")
    page.locator("#app").wait_for(state="visible")
    page.set_input_files("#file-input", str(song))  # picked, not dropped
    page.locator("#source-waveform canvas").first.wait_for()
    page.check(".preset[data-preset=phantom_center] input")
    worker = next(p for p in stack.procs if p.name.startswith("worker-"))
    os.killpg(worker.pid, signal.SIGSTOP)  # the worker freezes: the split waits in the queue
    try:
        page.click("#split-button")
        until(page, "() => document.querySelector('#job-stage').textContent === 'queued'")
        shots(page, "09-queued")
        page.click("#cancel-button")
        page.locator("#job-message").wait_for(state="visible")
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    assert "cancelled" in page.text_content("#job-message")
    assert page.text_content("#job-stage") == "cancelled" and page.locator("#mixer").is_hidden()
    shots(page, "10-cancelled")
    job = httpx.get(stack.base + "/stem_split", headers={"x-api-key": key}).json()["items"][0]
    assert job["status"] == "cancelled"
    assert page.problems == []


def test_master_download_and_split_the_mastered_version(stack, song, page, shots):
    key = stack.store.create_key("browser-master")
    api = httpx.Client(base_url=stack.base, headers={"x-api-key": key}, timeout=30)
    page.goto(f"{stack.base}/#key={key}")
    page.locator("#app").wait_for(state="visible")
    drop(page, "#dropzone", song)
    page.locator("#source-waveform canvas").first.wait_for()

    page.select_option("#master-preset", "podcast")
    page.click("#master-button")
    page.locator("#master-download").wait_for(state="visible", timeout=120_000)
    text = page.text_content("#master-result")
    assert text.startswith("podcast: ") and "LUFS" in text and "dBTP" in text and "LRA" in text
    lufs = float(text.split(": ")[1].split(" LUFS")[0])
    assert abs(lufs + 16.0) <= 0.5
    shots(page, "07-mastered")
    mastered_id = page.evaluate("() => window.stems.state.mastered.mastered_id")
    with page.expect_download() as download:
        page.click("#master-download")
    assert open(download.value.path(), "rb").read() == api.get(f"/download/mastered/{mastered_id}").content

    page.check("#use-master")
    page.check(".preset[data-preset=phantom_center] input")
    page.click("#split-button")
    page.locator("#mixer").wait_for(state="visible", timeout=120_000)
    job = api.get("/stem_split", params={"limit": 1}).json()["items"][0]
    assert stack.store.get_job(job["creation_id"]).source_id == mastered_id  # the mastered version was split
    assert page.locator("#stemfile-button").is_hidden()  # two stems: no DJ stem file
    assert page.problems == []
