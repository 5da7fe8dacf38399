"""The README's pictures of the Space and the browser page: a desktop in the light and a phone in the dark each.

    python docs/screenshots.py --model runs/guppy        # writes docs/images/{space,web}-{desktop,phone}.png

Both demos run on 127.0.0.1 with the given model and are driven by headless Chromium (Debian's, as in the tests);
the images are reduced to 256 colours to stay small.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import CHROMIUM, CHROMIUM_ARGS, DESKTOP, PHONE, free_port, guppylm_command, running_server  # noqa: E402

IMAGES = ROOT / "docs" / "images"
REPLIES = "#chat .message:not(.thought) > [data-testid=bot]"  # Guppy's replies in the Space, without their notes


def shoot(page, name):
    path = IMAGES / f"{name}.png"
    page.screenshot(path=path)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1000:.0f} KB")


def space(browser, url):
    page = browser.new_page(viewport=DESKTOP, color_scheme="light")
    page.goto(url)
    replies, box = page.locator(REPLIES), page.get_by_placeholder("Say something")
    page.get_by_role("button", name="are you hungry?").click()
    expect(replies).to_have_count(1, timeout=60_000)
    expect(box).to_be_editable(timeout=60_000)
    box.fill("what do you think about taxes?")
    box.press("Enter")
    expect(replies).to_have_count(2, timeout=60_000)
    expect(box).to_be_editable(timeout=60_000)
    shoot(page, "space-desktop")

    page = browser.new_page(viewport=PHONE, color_scheme="dark")
    page.goto(url)
    replies, box = page.locator(REPLIES), page.get_by_placeholder("Say something")
    box.fill("hi Zebra, are you hungry today?")
    box.press("Enter")
    expect(replies).to_have_count(1, timeout=60_000)
    expect(box).to_be_editable(timeout=60_000)
    replies.last.click()
    expect(page.locator("#read .tokens .tok.unknown")).to_be_visible(timeout=60_000)
    page.locator("#inside-caption").scroll_into_view_if_needed()
    shoot(page, "space-phone")


def web_chat(browser, url, viewport, scheme, chip, message):
    """The page after an example chip and a typed message have both been answered."""
    page = browser.new_page(viewport=viewport, color_scheme=scheme)
    page.goto(url)
    expect(page.locator("body[data-state=ready]")).to_have_count(1, timeout=60_000)
    page.get_by_role("button", name=chip).click()
    expect(page.locator("body[data-state=ready]")).to_have_count(1, timeout=60_000)
    page.fill("#message", message)
    page.press("#message", "Enter")
    expect(page.locator("li.guppy[data-ids]")).to_have_count(2, timeout=60_000)
    return page


def web(browser, url):
    page = web_chat(browser, url, DESKTOP, "light", "is the water too warm?", "hi Zebra, do you like bubbles?")
    page.locator("details.inside summary").last.click()
    page.evaluate("window.scrollTo(0, 0)")
    shoot(page, "web-desktop")
    shoot(web_chat(browser, url, PHONE, "dark", "are you hungry?", "what is the internet?"), "web-phone")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/guppy")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GUPPYLM_MODEL=args.model, GRADIO_SERVER_NAME="127.0.0.1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))  # fmt: skip
    space_port, web_port = free_port(), free_port()
    space_command = [sys.executable, str(ROOT / "space" / "app.py")]
    web_command = guppylm_command("serve-web", "--model", args.model, "--port", web_port)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    with (
        running_server(space_command, f"http://127.0.0.1:{space_port}/", logs / "space.log", 180, {**env, "GRADIO_SERVER_PORT": str(space_port)}) as space_url,
        running_server(web_command, f"http://127.0.0.1:{web_port}/", logs / "web.log", 300, env) as web_url,
        sync_playwright() as playwright,
    ):  # fmt: skip
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        space(browser, space_url)
        web(browser, web_url)
        browser.close()


if __name__ == "__main__":
    main()
