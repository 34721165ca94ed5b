"""Screenshot of the page at 1440×900 (what a newcomer sees without scrolling), against the tiny model on CPU.

    python docs/screenshot.py docs/page_after.png [--nproc 2] [--generate]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.tiny import ensure_tiny_model  # noqa: E402
from tests.ui_server import SMALL, running_app  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--generate", action="store_true", help="generate a small video first")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        tiny = ensure_tiny_model(Path(tmp) / "tiny-random")
        with running_app(Path(tmp) / "app", tiny, nproc=args.nproc) as app, sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1440, "height": 900})
            page.goto(app.url)
            page.wait_for_selector("#generate")
            if args.generate:
                page.locator("#prompt textarea").fill("a lighthouse at dawn")
                for elem_id, key in (("frames", "frame_num"), ("steps", "sample_steps")):
                    box = page.locator(f"#{elem_id} input[type=number]").first
                    box.fill(str(SMALL[key]))
                    box.press("Enter")
                page.locator("#size input").first.click()
                page.get_by_role("option", name=SMALL["size"], exact=True).click()
                page.click("#generate")
                page.wait_for_function("() => /^Done/.test(document.querySelector('#status textarea').value)",
                                       timeout=120_000)
                page.wait_for_timeout(1000)
                page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(args.out))
            b.close()
    from PIL import Image

    small = Image.open(args.out).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(args.out, optimize=True)  # a palette PNG: well under 300 KB
    print(args.out, args.out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
