"""Plain helpers of the browser tests: viewport sizes, full-page screenshots, waits and the
layout-shift recorder (Chromium's PerformanceObserver 'layout-shift' entries)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WIDTHS = {"desktop": (1280, 800), "phone": (390, 844)}

RECORD_SHIFTS = """
window.__shifts = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) {
    if (!e.hadRecentInput) window.__shifts.push({value: e.value,
      sources: (e.sources || []).map((s) => {
        const el = s.node && (s.node.nodeType === 1 ? s.node : s.node.parentElement);
        return el ? el.outerHTML.slice(0, 160) : '?';
      })});
  }
}).observe({type: 'layout-shift', buffered: false});
"""


def viewport(driver: Any, name: str) -> None:
    width, height = WIDTHS[name]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": name == "phone"})


def screenshot(driver: Any, folder: Path, page: str) -> list[Path]:
    """The whole page at both widths, as `<page>-<width>.png`; leaves the desktop viewport set."""
    saved = []
    for name, (width, _) in WIDTHS.items():
        viewport(driver, name)
        time.sleep(0.4)  # a relayout and the lazy images of the new width
        height = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 6000), "scale": 1}})
        path = folder / f"{page}-{width}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        saved.append(path)
    viewport(driver, "desktop")
    return saved


def wait_until(driver: Any, condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 — an element not there yet
            last_error = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error}); "
                         f"page text: {driver.find_element('tag name', 'body').text[:1500]}")
