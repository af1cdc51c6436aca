"""Fixtures of the console's browser tests: Debian's chromium and chromium-driver (installed with apt
when missing: CI runs as root), the embedded stack of `lathe dev` with a second tenant, and a headless
Chromium driven by Selenium through the installed chromedriver (Selenium's own driver download is
not reachable from CI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lifecycle.lifecycle_helpers import build_tiny_assets

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".lathe" / "screenshots"
OTHER_TOKEN = "other-tenant-console-token"


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("the browser tests need chromium and chromium-driver (apt-get install -y chromium "
                        "chromium-driver), which only root can install here")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True, timeout=300)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"apt-get install chromium chromium-driver failed:\n{proc.stderr[-2000:]}"
    return CHROMEDRIVER


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline: Any) -> Iterator[Any]:
    """`lathe dev`'s stack (local S3, API with the LocalLauncher, the real trainer) with the tiny model
    and dataset the lifecycle tests build, plus a second tenant `other`."""
    from service.dev.stack import DevStack
    from service.tenants import hash_token

    class TwoTenants(DevStack):
        def _start_api(self, tokens: Path) -> None:
            doc = json.loads(tokens.read_text())
            doc["tenants"].append({**doc["tenants"][0], "name": "other", "token_sha256": [hash_token(OTHER_TOKEN)]})
            tokens.write_text(json.dumps(doc))
            super()._start_api(tokens)

    assets = build_tiny_assets(tmp_path_factory, tiny_pipeline)
    work = tmp_path_factory.mktemp("console-dev")
    shutil.copytree(assets["model"], work / "tiny-sd1")
    shutil.copytree(assets["data"], work / "tiny-data")
    environ = dict(os.environ)  # the stack points AWS_* at its own S3 server for this process
    dev = TwoTenants(work, api_port=0, settings_overrides={"max_running_jobs": 2})  # the two jobs train side by side
    try:
        dev.start()
        yield dev
    finally:
        dev.stop()
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--force-prefers-reduced-motion", "--lang=en-GB"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(chromium)), options=options)
    driver.set_script_timeout(30)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
