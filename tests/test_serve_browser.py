"""The asr-serve page in a real browser: headless Chromium whose fake microphone plays a recording.

Chromium (Debian's ``chromium`` and ``chromium-driver``: ``apt-get install chromium
chromium-driver``) is driven by Selenium (PyPI). It loads ``/`` from an ``asr-serve`` process,
presses Start, and the page's AudioWorklet sends the fake microphone's audio (the file given with
``--use-file-for-fake-audio-capture``) over the rich WebSocket protocol; the test waits until the
page shows the recording's transcript; then it gives the page the file itself (POST /transcribe).
The screenshot is saved to
``$ASR_TEST_ARTIFACTS/serve_browser.png`` (default ``exp/test-artifacts/``), pass or fail.

Model: ``tests/data/stream_tiny.pt``, overfit on the test recordings after varied leading silence
(tests/data/README.md), so it recognises the recording wherever in the microphone's stream it starts.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asr.audio import load_audio

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
MODEL = DATA / "stream_tiny.pt"
RECORDING = DATA / "audio" / "pocketsphinx_goforward.flac"
TEXT = "go forward ten meters"


def _browser() -> tuple[str, str]:
    """(chromium binary, chromedriver), or skip saying what is missing."""
    pytest.importorskip("aiohttp", reason="asr-serve needs aiohttp: pip install -e '.[serve]'")
    pytest.importorskip("selenium", reason="the browser test needs selenium: pip install selenium")
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium/chromedriver: apt-get install chromium chromium-driver")
    return binary, driver


@pytest.fixture
def server():
    """An asr-serve process on a free port; yields its base URL."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "asr.cli.serve", "--model", str(MODEL), "--port", "0", "--no-lm", "--tick", "0.05",
         "--threads", "1", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = ""
        for line in proc.stderr:  # type: ignore[union-attr]
            if "listening on" in line:
                break
        match = re.search(r"listening on (http://\S+) ", line)
        assert match, f"asr-serve did not start: {line!r} (exit {proc.poll()})"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_page_transcribes_the_fake_microphone(server, tmp_path):
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wave = load_audio(RECORDING).numpy()
    silence = np.zeros(int(0.5 * 16000), dtype=np.float32)
    wav = tmp_path / "speech.wav"  # speech, then 2.5 s of silence so that the endpoint closes it
    sf.write(wav, np.concatenate([silence, wave, silence, silence, silence, silence, silence]), 16000,
             subtype="PCM_16")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}", "--window-size=1000,700"):
        opts.add_argument(arg)
    artifacts = Path(os.environ.get("ASR_TEST_ARTIFACTS", ROOT / "exp" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        browser.get(server + "/")
        assert browser.find_element(By.ID, "status").text == "idle"
        browser.find_element(By.ID, "start").click()
        try:
            WebDriverWait(browser, 60, poll_frequency=0.2).until(
                lambda b: TEXT in b.find_element(By.ID, "finals").text)
        finally:
            browser.save_screenshot(str(artifacts / "serve_browser.png"))
        assert browser.find_element(By.ID, "status").text.startswith("listening")
        assert not browser.find_element(By.ID, "download-srt").get_attribute("disabled")
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 30, poll_frequency=0.2).until(
            lambda b: b.find_element(By.ID, "status").text.startswith("done"))
        # a file given to the page goes through POST /transcribe and is appended as finals
        browser.find_element(By.ID, "file").send_keys(str(RECORDING))
        WebDriverWait(browser, 30, poll_frequency=0.2).until(
            lambda b: b.find_element(By.ID, "finals").text.count(TEXT) == 2)
        assert "transcribed" in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()
    assert (artifacts / "serve_browser.png").stat().st_size > 1000
