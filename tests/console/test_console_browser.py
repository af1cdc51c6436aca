"""The web console in a real browser (headless Chromium through Selenium) against `lathe dev`'s stack
and the real trainer: sign in, submit a tiny job, watch it reach `succeeded` without reloading and
without a layout shift, then its curves, samples, downloads; a bad spec's problem next to its field;
another tenant's job as "not found"; a job name holding HTML shown as text. Every page is saved as a
screenshot at 1280×800 and 390×844 under .lathe/screenshots/.

The tests run in file order and share the jobs they submit (one tiny training run each)."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from typing import Any

import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.console.conftest import OTHER_TOKEN, SCREENSHOTS
from tests.console.console_helpers import RECORD_SHIFTS, screenshot, wait_until

XSS_NAME = "<img src=x onerror=alert(1)>"
PROMPTS = ["a photo of sks cat --w 64 --h 64 --s 2", "<b>bold</b> dog --w 64 --h 64 --s 2"]


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


def _spec(stack: Any, name: str, lr: float, shrink: bool, steps: int = 6) -> dict[str, Any]:
    spec = stack.example_spec(max_train_steps=steps)
    spec["name"] = name
    spec["optimizer"]["learning_rate"] = lr
    spec["sample"] = {"prompts": PROMPTS, "every_n_steps": 3}
    spec["shrink"] = {"enabled": shrink, "rank": 2, "plot": shrink}
    return spec


def _api(stack: Any, path: str, body: Any = None, token: str | None = None) -> Any:
    req = urllib.request.Request(stack.url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token or stack.token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def _set_editor(driver: Any, text: str) -> None:
    driver.execute_script("const t = document.getElementById('spec-text'); t.value = arguments[0];"
                          "t.dispatchEvent(new Event('input', {bubbles: true}));", text)


def _no_alert(driver: Any) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 — raises when no dialog is open


def test_sign_in_submit_and_watch_the_job_live(browser, stack, state):
    # A second job to compare with, submitted through the API so that both train at the same time.
    state["b"] = _api(stack, "/v1/jobs", {"spec": _spec(stack, "console-b", 2e-4, shrink=False, steps=3)})["id"]
    browser.get(stack.url + "/ui/")
    token = wait_until(browser, lambda: browser.find_element(By.ID, "token"), 20, "the sign-in form")
    screenshot(browser, SCREENSHOTS, "signin")
    token.send_keys("not-a-token", Keys.ENTER)
    wait_until(browser, lambda: "not valid" in browser.find_element(By.ID, "signin-error").text, 10, "the refusal")
    token.clear()
    token.send_keys(stack.token, Keys.ENTER)
    wait_until(browser, lambda: browser.find_element(By.CSS_SELECTOR, "table.jobs tbody tr"), 20, "the jobs list")
    assert browser.execute_script("return document.cookie") == ""  # the token is in sessionStorage only
    assert stack.token not in browser.current_url

    browser.find_element(By.LINK_TEXT, "Submit").click()
    _set_editor(browser, json.dumps(_spec(stack, XSS_NAME, 1e-4, shrink=True), indent=2))
    wait_until(browser, lambda: "passes the checks" in browser.find_element(By.ID, "check-status").text, 30,
               "the spec checks")
    browser.find_element(By.ID, "submit-job").click()
    wait_until(browser, lambda: "#/jobs/j-" in browser.current_url, 60, "the job page")
    state["a"] = browser.current_url.rsplit("/", 1)[1]
    wait_until(browser, lambda: browser.find_element(By.CSS_SELECTOR, "section.live"), 20, "the progress section")
    browser.execute_script(RECORD_SHIFTS + "window.__sameDocument = true;")

    seen: list[str] = []
    steps: set[str] = set()

    def finished() -> bool:
        phase = browser.find_element(By.CSS_SELECTOR, ".job-head .phase").text
        if not seen or seen[-1] != phase:
            seen.append(phase)
        if phase in ("training", "shrinking", "uploading"):  # a tiny run may train between two events
            steps.add(browser.find_element(By.CSS_SELECTOR, ".stats .stat dd").text)
        return phase in ("succeeded", "failed", "cancelled")

    wait_until(browser, finished, 300, "the job to finish")
    assert seen[-1] == "succeeded", (seen, browser.find_element(By.TAG_NAME, "body").text[:2000])
    assert "training" in seen and steps - {"—"}, (seen, steps)  # progress arrived live
    assert browser.execute_script("return window.__sameDocument === true")  # never reloaded
    time.sleep(1.5)  # the results section fills in after the last event
    shifts = browser.execute_script("return window.__shifts")
    assert shifts == [], shifts


def test_job_page_shows_curves_samples_downloads_and_names_as_text(browser, stack, state):
    job = _api(stack, f"/v1/jobs/{state['a']}")
    images = wait_until(browser, lambda: (imgs := browser.find_elements(By.CSS_SELECTOR, ".gallery img")) and all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in imgs)
        and imgs, 30, "the sample images")
    screenshot(browser, SCREENSHOTS, "job")
    assert len(images) == 4  # two prompts at steps 3 and 6
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, ".gallery figcaption")]
    assert captions.count("<b>bold</b> dog") == 2 and captions.count("a photo of sks cat") == 2, captions
    loss = browser.find_element(By.CSS_SELECTOR, ".charts figure:first-child polyline")
    assert int(loss.get_attribute("data-points")) == 6  # one per step
    assert int(browser.find_element(By.CSS_SELECTOR, ".charts figure:last-child polyline").get_attribute("data-points")) == 6
    plots = browser.find_elements(By.CSS_SELECTOR, ".figures img")
    assert plots and "shrink" in plots[0].get_attribute("data-name")
    summary = browser.find_element(By.CSS_SELECTOR, "#summary").text  # the metadata summary
    assert "tiny-sd1" in summary and "base model sha256" in summary, summary

    assert browser.find_element(By.CSS_SELECTOR, "h1.job-name").text == XSS_NAME
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    _no_alert(browser)

    links = browser.find_elements(By.CSS_SELECTOR, "a[data-download]")
    by_name = {o["name"]: o for o in job["outputs"]}
    assert {a.get_attribute("data-download") for a in links} == set(by_name)
    for a in links:
        name = a.get_attribute("data-download")
        if name.endswith(".safetensors") or name == "metadata.json":  # presigned on this s3:// root
            with urllib.request.urlopen(a.get_attribute("href"), timeout=30) as resp:
                assert hashlib.sha256(resp.read()).hexdigest() == by_name[name]["sha256"], name


def test_jobs_list_shows_both_jobs_with_names_as_text(browser, stack, state):
    browser.get(stack.url + "/ui/#/")
    rows = wait_until(browser, lambda: (r := browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")) and
                      len(r) >= 2 and r, 20, "two rows")
    screenshot(browser, SCREENSHOTS, "jobs-running")
    names = {r.get_attribute("data-job"): r.find_element(By.CSS_SELECTOR, "td.name a").text for r in rows}
    assert names[state["a"]] == XSS_NAME and names[state["b"]] == "console-b"
    _no_alert(browser)
    wait_until(browser, lambda: _api(stack, f"/v1/jobs/{state['b']}")["phase"] == "succeeded", 300, "job b")
    wait_until(browser, lambda: "succeeded" in browser.find_element(By.CSS_SELECTOR, f"tr[data-job='{state['b']}']").text,
               10, "the list to update without a reload")
    screenshot(browser, SCREENSHOTS, "jobs")


def test_compare_shows_spec_differences_curves_and_samples(browser, stack, state):
    browser.get(f"{stack.url}/ui/#/compare/{state['a']}/{state['b']}")
    table = wait_until(browser, lambda: browser.find_element(By.CSS_SELECTOR, "table.diff"), 20, "the differences")
    time.sleep(2)
    screenshot(browser, SCREENSHOTS, "compare")
    assert "optimizer.learning_rate" in table.text and "shrink.enabled" in table.text
    wait_until(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline")) == 2, 20, "two curves")
    wait_until(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, ".pair")) == 2, 20, "sample pairs")


def test_a_bad_spec_shows_each_problem_next_to_its_field(browser, stack, state):
    browser.get(stack.url + "/ui/#/submit")
    wait_until(browser, lambda: browser.find_element(By.ID, "spec-text"), 10, "the editor")
    spec = stack.example_spec()
    spec["network"]["dim"] = -3
    _set_editor(browser, json.dumps(spec, indent=2))
    row = wait_until(browser, lambda: browser.find_element(By.CSS_SELECTOR, '.field[data-path="network.dim"] .problem'),
                     20, "the problem on network.dim")
    assert row.text and "has-error" in browser.find_element(By.CSS_SELECTOR, '.field[data-path="network.dim"]').get_attribute("class")
    screenshot(browser, SCREENSHOTS, "submit-problem")
    _set_editor(browser, "accelerate launch train_network.py --pretrained_model_name_or_path=s3://lathe/models/x "
                         "--dataset_config /etc/passwd")
    browser.find_element(By.XPATH, "//button[text()='Convert to spec']").click()
    refused = wait_until(browser, lambda: browser.find_element(By.CSS_SELECTOR, '.field[data-path="--dataset_config"] .problem'),
                         20, "the refused flag")
    assert "does not read files" in refused.text
    screenshot(browser, SCREENSHOTS, "submit-convert")


def test_another_tenants_job_is_not_found(browser, stack, state):
    browser.find_element(By.ID, "signout").click()
    token = wait_until(browser, lambda: browser.find_element(By.ID, "token"), 10, "the sign-in form")
    token.send_keys(OTHER_TOKEN, Keys.ENTER)
    wait_until(browser, lambda: browser.find_element(By.CSS_SELECTOR, "h1").text == "Jobs", 10, "the jobs list")
    browser.get(f"{stack.url}/ui/#/jobs/{state['a']}")
    wait_until(browser, lambda: browser.find_element(By.CSS_SELECTOR, ".notfound h1").text == "Job not found", 20,
               "not found")
    assert XSS_NAME not in browser.find_element(By.TAG_NAME, "body").text
    screenshot(browser, SCREENSHOTS, "notfound")


def test_a_failed_job_shows_its_reason_and_exit_code(browser, stack, state):
    # A new user's first mistake: a mistyped model URI. The job is accepted (the prefix is the tenant's;
    # only the trainer reads the model) and fails when it fetches it.
    spec = stack.example_spec(max_train_steps=2)
    spec["name"] = "mistyped model"
    spec["model"]["uri"] = spec["model"]["uri"].rstrip("/") + "-typo"
    job_id = _api(stack, "/v1/jobs", {"spec": spec})["id"]
    deadline = time.monotonic() + 240
    while _api(stack, f"/v1/jobs/{job_id}")["phase"] not in ("failed", "succeeded", "cancelled"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(1)
    job = _api(stack, f"/v1/jobs/{job_id}")
    assert job["phase"] == "failed", job
    browser.get(stack.url + "/ui/")  # signed in as this job's tenant again (the test before signed in as another)
    browser.execute_script("sessionStorage.clear()")
    browser.get(stack.url + "/ui/")
    wait_until(browser, lambda: browser.find_element(By.ID, "token"), 20, "the sign-in form").send_keys(
        stack.token, Keys.ENTER)
    wait_until(browser, lambda: browser.find_element(By.CSS_SELECTOR, "h1").text == "Jobs", 20, "the jobs list")
    browser.get(f"{stack.url}/ui/#/jobs/{job_id}")
    attempts = wait_until(browser, lambda: (t := browser.find_element(By.CSS_SELECTOR, "table.attempts")).text
                          and job["error"]["reason"] in t.text and t, 30, "the attempts table")
    screenshot(browser, SCREENSHOTS, "job-failed")
    past = [li.text for li in browser.find_elements(By.CSS_SELECTOR, ".timeline li.past")]
    assert past == ["queued", "preparing"], past  # it failed before training: later phases are not marked
    assert str(job["attempts"][-1]["exit_code"]) in attempts.text, attempts.text
    body = browser.find_element(By.TAG_NAME, "body").text
    assert job["error"]["message"][:40] in body, body[:2000]
