"""A headless Chromium for the tests that look at the MLflow UI as a user would (Debian's
`chromium`; .ci/run installs it when it is missing)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = "1600,1000"


def require_chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs it with apt-get")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run([require_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={profile}", f"--window-size={WINDOW}", *args],
                              capture_output=True, text=True, timeout=timeout)


def page_text(url: str, expect: list[str], timeout: float = 120) -> str:
    """The visible text of ``url`` once the app has rendered every string in ``expect``."""
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        dom = _run(["--virtual-time-budget=30000", "--dump-dom", url], timeout=max(10.0, deadline - time.time())).stdout
        body = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
        text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))
        if all(e in text for e in expect):
            return text
        time.sleep(2)
    missing = [e for e in expect if e not in text]
    raise AssertionError(f"{url} never showed {missing}; the page read: {text[:3000]}")


def screenshot(url: str, path: str, timeout: float = 120) -> str:
    _run(["--virtual-time-budget=30000", "--hide-scrollbars", f"--screenshot={path}", url], timeout=timeout)
    assert os.path.getsize(path) > 10_000, "the screenshot is empty"
    return path
