"""Screenshots of every dashboard page in headless Chromium, at 1440 and 800 px wide, in the light
and the dark theme: `python scripts/screenshots.py STORE OUTDIR [--pages /,/loops]`.

For looking at the dashboard as a person would (issue reviews, the README's docs/screenshots); not a
test. It serves STORE read-only on a free loopback port with the real app.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import threading
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from werkzeug.serving import make_server

from mythos_probe.collectors.parquet_store import open_read_only
from mythos_probe.dashboards.app import create_app
from mythos_probe.dashboards.pages import PAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--pages", default=",".join(p.PATH for p in PAGES), help="comma-separated paths, with query")
    parser.add_argument("--widths", default="1440,800")
    parser.add_argument("--themes", default="light,dark")
    parser.add_argument("--wait", type=float, default=6.0, help="seconds to let a page draw")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = open_read_only(args.store)
    server = make_server("127.0.0.1", 0, create_app(store).server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    profile = tempfile.mkdtemp(prefix="mythos-shots-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    try:
        for theme in args.themes.split(","):
            driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                   {"features": [{"name": "prefers-color-scheme", "value": theme}]})
            for width in map(int, args.widths.split(",")):
                driver.set_window_size(width, 1000)
                for path in args.pages.split(","):
                    driver.get(url + path)
                    time.sleep(args.wait)
                    height = driver.execute_script("return document.documentElement.scrollHeight")
                    scroll_w = driver.execute_script("return document.documentElement.scrollWidth")
                    driver.set_window_size(width, min(max(height, 600), 4000))
                    time.sleep(0.5)
                    name = (path.strip("/").split("?")[0] or "forwards").replace("/", "_")
                    if "?" in path:
                        name += "_q"
                    target = args.out / f"{name}-{width}-{theme}.png"
                    driver.save_screenshot(str(target))
                    print(f"{target}  scrollWidth={scroll_w}{'  (scrolls sideways)' if scroll_w > width else ''}")
                    driver.set_window_size(width, 1000)
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
