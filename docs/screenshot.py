"""Screenshot of the page at 1440×900 (what a newcomer sees without scrolling), against the tiny model on CPU.

    python docs/screenshot.py docs/page_after.png [--nproc 2] [--generate]
    python docs/screenshot.py docs/page_i2v.png --task i2v-14B --generate   # the image-to-video page
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.tiny import ensure_tiny_model  # noqa: E402
from tests.ui_server import SMALL, running_app  # noqa: E402


def sample_image(folder: Path, name: str) -> Path:
    """A 4:3 picture to upload: a sky-to-sea gradient with a sun (the last frame: the sun lower)."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = 300, 400
    sky = np.linspace([90, 140, 220], [250, 190, 120], h // 2).astype(np.uint8)
    sea = np.linspace([30, 80, 140], [10, 30, 70], h - h // 2).astype(np.uint8)
    img = Image.fromarray(np.repeat(np.concatenate([sky, sea])[:, None], w, axis=1))
    y = 60 if name == "image" else 130
    ImageDraw.Draw(img).ellipse([170, y, 230, y + 60], fill=(255, 220, 90))
    path = folder / f"{name}.png"
    img.save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--generate", action="store_true", help="generate a small video first")
    ap.add_argument("--task", help="i2v-14B / flf2v-14B: the page of the tiny image-to-video model (an image uploaded)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        tiny = ensure_tiny_model(Path(tmp) / "tiny-random")
        task = ["--task", args.task] if args.task else []
        with running_app(Path(tmp) / "app", tiny, *task, nproc=args.nproc) as app, sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = b.new_page(viewport={"width": 1440, "height": 900})
            page.goto(app.url)
            page.wait_for_selector("#generate")
            for name in ("image", "last_frame")[: {"i2v-14B": 1, "flf2v-14B": 2}.get(args.task or "", 0)]:
                page.locator(f"#{name} input[type=file]").set_input_files(str(sample_image(Path(tmp), name)))
                page.wait_for_function(f"() => document.querySelector('#{name} img')?.naturalWidth > 0")
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
