"""Browser fixtures: Debian's chromium (installed with apt when missing), driven by Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
# the flags the project's machines need: no sandbox as root, no GPU, nothing phoning home
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]


def _install_chromium() -> str | None:
    """Install Debian's chromium; None when done, else why it could not be."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine to install chromium with"
    if os.geteuid() != 0:
        return "installing chromium with apt-get needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            return f"`{' '.join(argv)}` failed: {done.stderr.strip()[-400:]}"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        why = _install_chromium()
        if why:
            pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM}: {why}")
    return CHROMIUM


@pytest.fixture(scope="session")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path):
    """save(page, name): a full-page screenshot under the test's tmp dir (and STEMS_SCREENSHOTS, when set)."""
    extra = os.environ.get("STEMS_SCREENSHOTS")

    def save(page, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / path.name)
        return path

    return save
