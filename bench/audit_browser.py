"""Render an audit.html in headless Chromium: a screenshot, and whether every thumbnail loaded.

    .venv/bin/python bench/audit_planted.py --keep OUT     # writes OUT/audit.html
    .venv/bin/python bench/audit_browser.py OUT/audit.html OUT/audit.png

Needs Debian's `chromium` (`apt-get install chromium`); no Python browser driver. The
page is loaded twice from a file:// URL with no network: once as it is, for the
screenshot, and once from a copy with a small script appended that counts, after the load
event, the images the browser decoded (`complete` and `naturalWidth > 0`); Chromium's
`--dump-dom` prints the document with that count in it. Prints one JSON document.
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
window.addEventListener("load", () => {
  const images = [...document.images];
  const result = {
    images: images.length,
    loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    title: document.title,
    sections: [...document.querySelectorAll("h2")].map((h) => h.textContent),
    height: document.documentElement.scrollHeight,
  };
  const out = document.createElement("pre");
  out.id = "vtl-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
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


def check_page(page: Path, png: Path, width: int = 1280, height: int = 1800) -> dict:
    """Screenshot `page` into `png`; return what the browser saw after the load event."""
    with tempfile.TemporaryDirectory(prefix="vtl-chromium-") as tmp:
        profile = Path(tmp) / "profile"
        chromium(
            f"--window-size={width},{height}",
            f"--screenshot={png.resolve()}",
            page.resolve().as_uri(),
            profile=profile,
        )
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
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
    args = parser.parse_args()
    print(json.dumps(check_page(args.page, args.png), indent=2))


if __name__ == "__main__":
    main()
