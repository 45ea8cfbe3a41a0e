"""Render a page we write (audit.html, review.html) in headless Chromium: a screenshot,
whether every thumbnail loaded, and what a click shows.

    .venv/bin/python bench/audit_planted.py --keep OUT     # writes OUT/audit.html
    .venv/bin/python bench/audit_browser.py OUT/audit.html OUT/audit.png
    .venv/bin/python bench/audit_browser.py EVAL/review.html EVAL/review.png \
        --click 'a[href="#cell-0-1"]' --after-png EVAL/cell.png

Needs Debian's `chromium` (`apt-get install chromium`); no Python browser driver. The
page is loaded twice from a file:// URL with no network: once as it is, for the
screenshot, and once from a copy with a small script appended that counts, after the load
event, the images the browser decoded (`complete` and `naturalWidth > 0`); Chromium's
`--dump-dom` prints the document with that count in it. With `--click SELECTOR` the script
then clicks that element like a person and reports, once the page has reacted, which
`section` elements are displayed and how many of their images decoded (and `--after-png`
screenshots the page at the clicked element's URL fragment). Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHECK = """<script>
const CLICK = __CLICK__;
const decoded = (images) => images.filter((i) => i.complete && i.naturalWidth > 0).length;
window.addEventListener("load", () => {
  const images = [...document.images];
  const result = {
    images: images.length,
    loaded: decoded(images),
    title: document.title,
    sections: [...document.querySelectorAll("h2")].map((h) => h.textContent),
    height: document.documentElement.scrollHeight,
  };
  const report = () => {
    const out = document.createElement("pre");
    out.id = "vtl-check";
    out.textContent = JSON.stringify(result);
    document.body.appendChild(out);
  };
  const target = CLICK ? document.querySelector(CLICK) : null;
  if (!CLICK) return report();
  result.clicked = target !== null;
  if (target) target.click();
  setTimeout(() => {
    const shown = [...document.querySelectorAll("section")].filter(
      (s) => getComputedStyle(s).display !== "none");
    result.visible = shown.map((s) => s.id);
    const inside = shown.flatMap((s) => [...s.querySelectorAll("img")]);
    result.visible_images = inside.length;
    result.visible_loaded = decoded(inside);
    result.visible_heights = shown.map((s) => s.getBoundingClientRect().height);
    report();
  }, 200);
});
</script>"""


def chromium(*args: str, profile: Path) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise SystemExit("needs chromium (Debian: apt-get install chromium)")
    command = [
        binary,
        "--headless",
        "--no-sandbox",  # running as root in a container
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout


def check_page(
    page: Path,
    png: Path,
    width: int = 1280,
    height: int = 1800,
    click: str | None = None,
    after_png: Path | None = None,
) -> dict:
    """Screenshot `page` into `png`; return what the browser saw after the load event (and
    after clicking `click`, a CSS selector)."""
    with tempfile.TemporaryDirectory(prefix="vtl-chromium-") as tmp:
        profile = Path(tmp) / "profile"
        chromium(
            f"--window-size={width},{height}",
            f"--screenshot={png.resolve()}",
            page.resolve().as_uri(),
            profile=profile,
        )
        fragment = re.search(r'href="#([^"]+)"', click or "")
        if after_png is not None and fragment:  # the page as the click leaves it
            chromium(
                f"--window-size={width},{height}",
                f"--screenshot={after_png.resolve()}",
                page.resolve().as_uri() + "#" + fragment.group(1),
                profile=profile,
            )
        probe = Path(tmp) / "probe.html"
        script = CHECK.replace("__CLICK__", json.dumps(click))
        probe.write_text(page.read_text().replace("</body>", script + "</body>"))
        dom = chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), profile=profile)
    found = re.search(r'<pre id="vtl-check">(.*?)</pre>', dom, re.S)
    if found is None:
        raise SystemExit("the check script did not run (no load event?)")
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return {**result, "screenshot": str(png), "screenshot_bytes": png.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--click", help="a CSS selector to click after the load event")
    parser.add_argument("--after-png", type=Path, help="screenshot after the click")
    args = parser.parse_args()
    result = check_page(args.page, args.png, click=args.click, after_png=args.after_png)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
