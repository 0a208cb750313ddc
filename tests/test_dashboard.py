"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against `farm serve`,
a real worker, Redis and the S3 server: log in, a bad spec's errors inline, a job submitted through
the page watched to done, an image's parameters opened, the jobs and workers pages.

Screenshots go to $FARM_SCREENSHOTS (the README's come from `FARM_SCREENSHOTS=docs`), else to
the test's own folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from farm.tokens import TokenBook
from tests.conftest import farm_serve

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SPEC = """model = "shapes-sd"
prompts = ["a red circle on a white background", "a blue square on a yellow background"]
seeds = { start = 1, count = 2 }
steps = 6
width = 64
height = 64
"""


@pytest.fixture
def served(farm_settings, s3_env, redis_client):
    with farm_serve({**s3_env, **farm_settings.to_env()}) as url:
        yield url, TokenBook(redis_client).create("ann")


def test_a_person_submits_a_job_watches_it_finish_and_reads_an_images_parameters(
        served, farm_settings, workers_factory, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    url, token = served
    workers_factory(farm_settings).start(1)
    shots = Path(os.environ.get("FARM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(url + "/")
        expect(page).to_have_url(url + "/login")  # no token yet: the pages send us to log in
        page.fill("input[name=token]", token)
        page.click("button:has-text('log in')")
        expect(page.locator("h2")).to_have_text("jobs")

        page.goto(url + "/submit")
        page.fill("#spec", SPEC.replace("steps = 6", "steps = 0"))
        page.click("button[type=submit]")
        expect(page.locator("#result")).to_contain_text("steps: must be 1-150, got 0")
        page.screenshot(path=str(shots / "dashboard-submit.png"))

        page.fill("#spec", SPEC)
        page.click("button[type=submit]")
        page.wait_for_url(url + "/jobs/**")
        job_id = page.url.rsplit("/", 1)[-1]
        expect(page.locator("#state")).to_have_text("done", timeout=180_000)
        expect(page.locator(".gallery img")).to_have_count(4)
        page.locator(".gallery img").nth(3).click()
        expect(page.locator("#parameters")).to_contain_text("Seed: 2")
        expect(page.locator("#parameters")).to_contain_text("a blue square on a yellow background")
        expect(page.locator("#links a")).to_have_text("manifest.jsonl")
        page.screenshot(path=str(shots / "dashboard-job.png"))

        page.goto(url + "/")
        row = page.locator(f"tr[data-job='{job_id}']")
        expect(row).to_contain_text("done")
        expect(row).to_contain_text("4/4")
        page.screenshot(path=str(shots / "dashboard-jobs.png"))

        page.goto(url + "/workers")
        expect(page.locator("#workers tbody tr")).to_have_count(1)
        expect(page.locator("#workers tbody")).to_contain_text("shapes-sd")
        page.screenshot(path=str(shots / "dashboard-workers.png"))
        browser.close()
