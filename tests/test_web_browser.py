"""The review page end to end in a real headless browser: Debian's chromium driven by Playwright
(never a downloaded browser), against `organizer web` over a small scanned library. Each step is
checked on disk, in the person folders; a screenshot of each page is saved in the test's temp
folder (its path is printed) for a person to look at."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import tree_hashes
from .websupport import WebProcess, scan_library, wait_for

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (uv sync)")
if not CHROMIUM.exists():
    pytest.skip(f"no browser: {CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return scan_library(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def web(lib, tmp_path_factory):
    proc = WebProcess("web", "--output", str(lib.output), log=tmp_path_factory.mktemp("weblog") / "web.log")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def _shot(page, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def _images_loaded(page) -> None:
    # polled from here: page.wait_for_function evaluates a string, which the page's CSP forbids
    wait_for(lambda: page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)"),
             30, "every image of the page to load")


def _wait_on_disk(predicate, what):
    return wait_for(predicate, 30, what)


def test_rename_reject_and_merge_in_the_browser(lib, web, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    # the people grid: one card per person folder, each with its representative crop loaded
    page.goto(web.url)
    assert "token=" not in page.url  # exchanged for the cookie
    before = lib.folders()
    cards = page.locator("li.card[data-person]")
    assert cards.count() == len(before) >= 4
    _images_loaded(page)
    _shot(page, tmp_path, "people")

    # rename in place: type a name, press Enter
    first = cards.nth(0)
    old = first.locator("input[name=name]").get_attribute("placeholder")
    first.locator("input[name=name]").fill("Alice Example")
    first.locator("input[name=name]").press("Enter")
    page.wait_for_load_state()
    assert "is now Alice Example" in page.locator(".flash").inner_text()
    _wait_on_disk(lambda: lib.folders().get("Alice Example") == before[old], "the renamed folder")
    assert old not in lib.folders()

    # a person's page: reject the first (farthest) face
    page.locator("li.card[data-person]").nth(0).locator("a").first.click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text().startswith("Alice Example")
    _images_loaded(page)
    _shot(page, tmp_path, "person")
    face = page.locator("li.card[data-face]").nth(0)
    photo = face.locator("a.photo").get_attribute("title")
    face.locator("button.reject-one").click()
    page.wait_for_load_state()
    assert "no longer in Alice Example" in page.locator(".flash").inner_text()
    _wait_on_disk(lambda: photo not in lib.folders().get("Alice Example", set())
                  and (lib.output / "doubtful" / photo).exists(), "the rejected photo in doubtful/")

    # the doubtful page shows it, with the reason
    page.goto(web.base + "/doubtful")
    assert "removed by you from Alice Example" in page.content()
    _shot(page, tmp_path, "doubtful")

    # merge two people: from the second person's page, "same person as" the first
    page.goto(web.base + "/")
    second = page.locator("li.card[data-person]").nth(1)
    other = second.locator("input[name=name]").get_attribute("placeholder")
    other_photos = lib.folders()[other]
    second.locator("a").first.click()
    page.wait_for_load_state()
    page.locator("input.merge-target").fill("Alice Example")
    page.get_by_role("button", name="Merge into them").click()
    page.wait_for_load_state()
    assert "merged into Alice Example" in page.locator(".flash").inner_text()
    _wait_on_disk(lambda: other not in lib.folders()
                  and other_photos <= lib.folders().get("Alice Example", set()), "the merged folder")
    assert lib.folders()["Alice Example"] == (before[old] - {photo}) | other_photos

    # the history lists the three corrections, made from the page
    page.goto(web.base + "/corrections")
    rows = page.locator("table.history tbody tr")
    assert rows.count() >= 3 and "page" in rows.nth(0).inner_text()
    _shot(page, tmp_path, "corrections")

    assert not errors, errors  # no script error, nothing refused by the content security policy
    assert tree_hashes(lib.watch) == lib.originals
    for name in ("people", "person", "doubtful", "corrections"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    page.close()
