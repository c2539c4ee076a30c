"""The README's picture of the playground: `hayate serve` on a real model, two questions asked in
the page by Playwright driving Debian's chromium, and a screenshot of the answers with their
numbers (time to first token, tokens/s, prompt tokens from the prefix cache, share of the floor).

    .venv/bin/python bench/playground_screenshot.py [--model FILE] [--out docs/images/playground.png]

Needs `pip install playwright` (in `.[test]`) and /usr/bin/chromium (`make browser`).
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

# bench/ is on sys.path: it is this script's folder.
from serve_compare import ServerSpec, free_port, running

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ("What is the capital of France?",
             "Write three sentences on why people visit it.")


def wait_for_floor(base: str, timeout_s: float) -> None:
    """The page shows the share of the floor once the server has measured it (after loading)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "hayate_decode_floor_tokens_per_second " in httpx.get(f"{base}/metrics", timeout=5).text:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the server did not measure its floor in {timeout_s:.0f} s")


def ask(page, question: str, answers: int) -> None:
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant .stats")).to_have_count(answers, timeout=120_000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file, folder or pulled name (default: hayate's default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs/images/playground.png")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("chromium is not installed (make browser)", file=sys.stderr)
        return 2
    port = free_port()
    command = [str(REPO / ".venv/bin/hayate"), "serve", "--port", str(port), "--threads", str(args.threads)]
    spec = ServerSpec("hayate", command + (["--model", args.model] if args.model else []), {}, port)
    with tempfile.TemporaryDirectory() as logs, running(spec, Path(logs) / "serve.log", 600):
        base = f"http://127.0.0.1:{port}"
        wait_for_floor(base, 120)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(base)
            page.fill("#system", "You are a concise assistant.")
            page.fill("#temperature", "0")
            for count, question in enumerate(QUESTIONS, start=1):
                ask(page, question, count)
            expect(page.locator("#live-share")).to_have_text(re.compile("% of floor"), timeout=10_000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
