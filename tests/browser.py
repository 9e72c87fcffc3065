"""Drives the web demo (``python -m prima_jax.demo``) in a headless Chromium, as a user would.

Used by tests/test_demo.py, and on its own to take the README's screenshot of a running demo:

  python tests/browser.py --url=http://127.0.0.1:7860 --image=a.png --image=b.png \
      --question="What is the bottommost object in the first image?" --screenshot=docs/web_demo.png

The browser is Debian's ``chromium`` (``apt-get install chromium``; playwright's own browser download is
not used), started with the flags that keep it off the network.
"""

from __future__ import annotations

import argparse
import shutil

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
  for name in ("chromium", "chromium-browser"):
    found = shutil.which(name)
    if found:
      return found
  raise FileNotFoundError("no chromium on PATH: install Debian's package (apt-get install chromium)")


def ask(url: str, images: list[str], question: str, *, answer_prefix: str | None = None,
        screenshot: str | None = None, timeout_s: float = 600.0) -> dict:
  """Uploads ``images``, asks ``question`` (the answer forced to start with ``answer_prefix`` when
  given) and waits for the answer.

  Returns dict(answer=the answer's visible text, highlighted=[(phrase, label, the label's CSS
  background colour)] of the grounded phrases, overlays=[(naturalWidth, naturalHeight)] of the overlay
  images as the browser decoded them, download_name and download_text=the offered file's name and
  content as the browser downloads it, status=the status line).
  """
  from playwright.sync_api import sync_playwright  # noqa: PLC0415

  timeout_ms = timeout_s * 1000
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1400, "height": 1000})
      page.goto(url, timeout=timeout_ms)
      page.locator("#images input[type=file]").set_input_files(images)
      # Each uploaded file is listed by name (its table cell's label) once the upload is done.
      for name in images:
        cell = f'#images td.filename[aria-label="{name.rsplit("/", 1)[-1]}"]'
        page.locator(cell).wait_for(timeout=timeout_ms)
      page.locator("#question textarea").fill(question)
      if answer_prefix:
        page.get_by_text("Start the answer with").click()
        page.locator("#answer_prefix textarea").fill(answer_prefix)
      page.locator("#ask").click()
      # The answer's download link, or gradio's error toast (an input the demo refused).
      page.locator("#download a, .toast-body.error").first.wait_for(timeout=timeout_ms)
      if page.locator(".toast-body.error").count():
        error = page.locator(".toast-body.error").first.inner_text()
        raise RuntimeError(f"the demo answered with an error: {error}")
      overlays = page.locator("#overlays img")
      overlays.nth(len(images) - 1).wait_for(timeout=timeout_ms)
      page.wait_for_function(
          "n => { const imgs = document.querySelectorAll('#overlays img');"
          " return imgs.length >= n && Array.from(imgs).every(i => i.complete && i.naturalWidth > 0); }",
          arg=len(images), timeout=timeout_ms)
      sizes = page.eval_on_selector_all(
          "#overlays img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
      highlighted = page.eval_on_selector_all(
          "#answer .token.highlighted",
          "els => els.map(e => [e.querySelector('.text').innerText, e.querySelector('.label').innerText,"
          " getComputedStyle(e.querySelector('.label')).backgroundColor])")
      link = page.locator("#download a[download]").first
      result = dict(answer=page.locator("#answer").inner_text(), highlighted=[tuple(h) for h in highlighted],
                    overlays=[tuple(s) for s in sizes], download_name=link.get_attribute("download"),
                    download_text=page.request.get(link.get_attribute("href")).text(),
                    status=page.locator("#status").inner_text())
      if screenshot:
        page.screenshot(path=screenshot, full_page=True)
      return result
    finally:
      browser.close()


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--url", required=True)
  parser.add_argument("--image", action="append", required=True)
  parser.add_argument("--question", required=True)
  parser.add_argument("--answer_prefix")
  parser.add_argument("--screenshot", required=True)
  args = parser.parse_args()
  print(ask(args.url, args.image, args.question, answer_prefix=args.answer_prefix,
            screenshot=args.screenshot))
