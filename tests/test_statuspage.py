"""The status page in a real headless browser (Debian's chromium + chromedriver, via selenium)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import POLL_S, iris_frame, make_config, register, split_payload, start, until

#: Where the screenshot is kept for people (CI keeps the folder as the run's artifact).
ARTIFACTS = Path(
    os.environ.get("MODELD_TEST_ARTIFACTS")
    or Path(__file__).resolve().parent.parent / "test-artifacts"
)

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install both)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,1400",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.mark.slow
async def test_status_page_renders_models_rejections_cache_and_registry(
    aiohttp_client, registry, cache_dir, tmp_path
):
    import shutil as sh

    c = registry.client()
    broken = tmp_path / "broken"
    sh.copytree(registry.models["const2"], broken)
    next(broken.glob("model.*")).unlink()
    register(c, "paged", registry.models["const1"])
    register(c, "aliased", registry.models["const1"])
    c.set_registered_model_alias("aliased", "gone", "1")
    config = make_config(
        registry,
        cache_dir,
        "models:/iris/Production",
        "paged=models:/paged/latest",
        "aliased=models:/aliased@gone",
        registry__poll_interval_s=POLL_S,
    )
    client = await start(aiohttp_client, config)
    register(c, "paged", broken)
    c.delete_registered_model_alias("aliased", "gone")  # the ref stops resolving
    for _ in range(40):  # traffic for the charts
        resp = await client.post("/models/iris/invocations", json=split_payload(iris_frame(1)))
        assert resp.status == 200
    bad = await client.post("/models/iris/invocations", json={"inputs": "nope"})
    assert bad.status == 400

    async def rejected():
        problem = (await (await client.get("/models/aliased")).json())["problem"]
        return problem and (await (await client.get("/models/paged")).json())["rejected"]

    assert await until(rejected)
    url = f"http://127.0.0.1:{client.server.port}/"
    shot = tmp_path / "status.png"

    def look():
        from selenium.webdriver.common.by import By

        driver = browser(tmp_path)
        try:
            driver.get(url)
            seen = {"title": driver.title}
            for name in ("iris", "paged", "aliased"):
                section = driver.find_element(By.CSS_SELECTOR, f'section[data-model="{name}"]')
                assert section.is_displayed() and section.size["height"] > 50
                seen[name] = {
                    "version": section.find_element(By.CSS_SELECTOR, ".version").text,
                    "state": section.find_element(By.CSS_SELECTOR, ".state").text,
                    "text": section.text,
                    "border": section.value_of_css_property("border-left-color"),
                    "colour": section.value_of_css_property("color"),
                    "lines": len(section.find_elements(By.CSS_SELECTOR, "svg polyline")),
                    "bands": len(section.find_elements(By.CSS_SELECTOR, "svg rect.band")),
                    "rejects": len(section.find_elements(By.CSS_SELECTOR, "svg path.reject")),
                    "chart_width": section.find_element(By.CSS_SELECTOR, "svg.spark").size["width"],
                }
            rejected_item = driver.find_element(By.CSS_SELECTOR, "ul.rejected li")
            seen["rejected_visible"] = rejected_item.is_displayed()
            seen["summary"] = driver.find_element(By.CSS_SELECTOR, ".summary").text
            seen["external"] = driver.execute_script(
                "return [...document.querySelectorAll('[src],[href]')].map(e => e.src || e.href)"
            )
            driver.save_screenshot(str(shot))
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "status-page.png")
            driver.set_window_size(390, 1400)  # a phone's width: the cards still fit
            seen["narrow"] = driver.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1"
            )
            return seen
        finally:
            driver.quit()

    seen = await asyncio.to_thread(look)
    assert seen["title"] == "modeld · 3 models"
    assert seen["iris"]["version"].startswith("v2") and "Production" in seen["iris"]["version"]
    assert seen["iris"]["state"] == "loaded"
    assert seen["paged"]["version"].startswith("v1")
    # a served model whose newer version was rejected is flagged, unlike a clean one
    assert seen["iris"]["border"] != seen["paged"]["border"]
    assert seen["iris"]["colour"] == seen["paged"]["colour"]  # body text stays neutral
    assert "v2 at load" in seen["paged"]["text"] and seen["rejected_visible"]
    # a ref that stopped resolving is red, and its chips say the registry does not know it
    red = seen["aliased"]["border"]
    assert red not in (seen["iris"]["border"], seen["paged"]["border"])
    chips = seen["aliased"]["version"]
    assert "not in the registry now" in chips and "@gone" not in chips, chips
    # the last hour is drawn: request and latency lines for the model with traffic, a band
    # for each served version, a mark for the rejected attempt
    assert seen["iris"]["lines"] >= 3 and seen["iris"]["bands"] >= 1
    assert seen["paged"]["rejects"] >= 1 and seen["iris"]["chart_width"] > 100
    assert seen["narrow"]
    assert "reachable" in seen["summary"] and "3 versions" in seen["summary"]  # broken one too
    assert "(no size limit, 3 versions kept per model)" in seen["summary"]
    assert seen["external"] == []  # self-contained: no external assets
    assert shot.stat().st_size > 10_000
    if os.environ.get("MODELD_KEEP_SHOT"):  # to look at it: MODELD_KEEP_SHOT=/path/shot.png
        sh.copy(shot, os.environ["MODELD_KEEP_SHOT"])
