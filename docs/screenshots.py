"""Make docs/people.png and docs/person.png: the review page over a scanned library, in Debian's
headless chromium (Playwright).

    uv run organizer scan --watch PHOTOS --output OUT      # e.g. a few people of ../shared/faces/dev
    uv run python docs/screenshots.py --output OUT [--person ID]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    from organizer.config import load_config
    from organizer.store import Store
    from organizer.store_review import ReviewQueries
    from organizer.web.server import WebServer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True)
    ap.add_argument("--person", type=int, help="whose page to show (default: the most photos)")
    args = ap.parse_args()
    settings = load_config(None, {"paths.output": args.output})
    with Store.open_readonly(settings.db_path) as store:
        person = args.person or ReviewQueries(store).page_people(limit=1)[0]["id"]
    server = WebServer(settings, "127.0.0.1", 0)
    server.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(server.url)
            for name, path in (("people", "/"), ("person", f"/person/{person}")):
                page.goto(server.url.split("?")[0].rstrip("/") + path)
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(DOCS / f"{name}.png"))
                small = Image.open(DOCS / f"{name}.png").convert("RGB").quantize(192, dither=Image.Dither.FLOYDSTEINBERG)
                small.save(DOCS / f"{name}.png", optimize=True)  # a third of the size, for the repository
                print(DOCS / f"{name}.png")
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
