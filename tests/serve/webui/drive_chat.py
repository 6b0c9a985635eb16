"""Drive Open WebUI's page in Chromium with Playwright: open it, choose the model, send one chat with the
default settings, wait for the streamed reply to show, save a screenshot. Prints one JSON line
({"reply": ..., "screenshot": ...}); exits 1 with a one-line error when the reply does not come.

Run with a Python that has playwright (Open WebUI's own venv, so that the project's dependencies stay as
they are); tests/serve/test_open_webui.py starts it:
    python drive_chat.py --url http://127.0.0.1:8080 --model tiny:latest --message "Name a color." \
        --chromium /usr/bin/chromium --screenshot shot.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def drive(url: str, model: str, message: str, chromium: str, screenshot: str, timeout_s: float) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
        box = page.locator("#chat-input")
        box.wait_for(timeout=timeout_s * 1000)
        for label in ("Okay, Let's Go!", "Close"):  # the release-notes dialog of a fresh install
            button = page.get_by_role("button", name=label)
            if button.count() and button.first.is_visible():
                button.first.click()
        page.wait_for_timeout(2000)  # the page picks a model once /api/tags has answered
        if not page.get_by_role("button", name=f"Selected model: {model}").count():
            page.locator("#model-selector-0-button, button[aria-label^='Select a model']").first.click()
            page.get_by_text(model, exact=True).first.click()
        box.click()
        page.keyboard.type(message)
        page.keyboard.press("Enter")
        reply = page.locator("#response-content-container").last
        reply.wait_for(timeout=timeout_s * 1000)
        deadline, text = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:  # streamed: wait until the text is there and stops growing
            now = reply.inner_text().strip()
            done = (
                page.locator("button[aria-label='Copy']").count() > 0
                or page.get_by_role("button", name="Copy").count() > 0
            )
            if now and now == text and done:
                break
            text = now
            time.sleep(1.0)
        page.screenshot(path=screenshot)
        browser.close()
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--message", required=True)
    parser.add_argument("--chromium", required=True)
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    try:
        text = drive(args.url, args.model, args.message, args.chromium, args.screenshot, args.timeout)
    except Exception as err:  # noqa: BLE001 - one line for the test to show
        print(f"error: {type(err).__name__}: {' '.join(str(err).split())[:400]}", file=sys.stderr)
        return 1
    print(json.dumps({"reply": text, "screenshot": args.screenshot}))
    return 0 if text else 1


if __name__ == "__main__":
    sys.exit(main())
