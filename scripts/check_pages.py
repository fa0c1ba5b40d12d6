"""Open every page of the built book in headless Chromium and check it as an offline reader would.

    python scripts/check_pages.py _build/html [--screenshots DIR] [--pages NAME ...]

The book is served from localhost. Every request to any other address (a CDN, a font
server, anything on the network) is refused and fails the page: the book must be
self-contained, so the check sees what a reader without a network gets. A page fails on:
a console error or page error, a failed or >= 400 local request, an attempt to reach the
network, an image that did not load, missing navigation, or maths that MathJax did not
render (MathJax not started, a `.math` element without an `mjx-container`, or raw TeX
delimiters such as \\( or $$ left in the visible text).
"""
import argparse
import functools
import http.server
import re
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL_HOSTS = ("127.0.0.1", "localhost")
LOCAL_SCHEMES = ("data", "blob", "about")  # in-page resources, never the network
# TeX that MathJax should have turned into mjx-container elements: \( \) \[ \] or $$
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$")


def is_local(url):
    u = urlparse(url)
    if u.scheme in LOCAL_SCHEMES or u.scheme == "file":
        return True
    return u.scheme in ("http", "https") and u.hostname in LOCAL_HOSTS


def serve(root):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def check_math(page):
    """Problems with the page's maths, and the number of math elements."""
    problems = []
    n_math = page.locator(".math").count()
    if not n_math:
        return problems, 0
    try:
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                               timeout=20000)
        page.evaluate("() => MathJax.startup.promise")
    except Exception as e:  # noqa: BLE001
        problems.append(f"MathJax did not start: {str(e).splitlines()[0]}")
    unrendered = page.evaluate("""() => [...document.querySelectorAll('.math')]
        .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.trim().slice(0, 60))""")
    problems += [f"math not rendered: {t!r}" for t in unrendered[:5]]
    if len(unrendered) > 5:
        problems.append(f"... and {len(unrendered) - 5} more math elements not rendered")
    n_rendered = page.locator("mjx-container").count()
    if n_rendered == 0:
        problems.append(f"{n_math} math elements but no mjx-container: MathJax rendered nothing")
    # Raw TeX left in what the reader sees (code cells and their outputs may show TeX on purpose)
    raw = page.evaluate("""() => {
        const skip = 'pre, code, script, style, mjx-container, mjx-assistive-mml, .highlight, .output';
        const out = [];
        const walker = document.createTreeWalker(document.querySelector('main') || document.body,
                                                 NodeFilter.SHOW_TEXT);
        for (let n = walker.nextNode(); n; n = walker.nextNode()) {
            if (n.parentElement && n.parentElement.closest(skip)) continue;
            out.push(n.textContent);
        }
        return out.join(' ');
    }""")
    for m in list(RAW_TEX.finditer(raw))[:3]:
        problems.append(f"raw TeX in the text: {raw[max(0, m.start() - 30):m.end() + 30]!r}")
    return problems, n_math


def check_page(page, url, n_chapters):
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: is_local(r.url)
            and problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    # navigation: the sidebar lists the chapters
    links = page.locator("nav.bd-docs-nav a.reference").count()
    if links < n_chapters:
        problems.append(f"navigation shows {links} chapter links, expected >= {n_chapters}")
    # images: every <img> decoded with a size
    broken = page.evaluate("""() => [...document.images]
        .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)""")
    problems += [f"image did not load: {src}" for src in broken]
    math_problems, n_math = check_math(page)
    return problems + math_problems, n_math


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("html", type=Path)
    ap.add_argument("--screenshots", type=Path, default=None)
    ap.add_argument("--pages", nargs="*", default=None, help="check only these pages (stems, e.g. 13_lora)")
    args = ap.parse_args(argv)
    root = args.html.resolve()
    all_pages = sorted((root / "book").glob("*.html"))
    if not all_pages:
        print(f"check_pages: no pages under {root}/book", file=sys.stderr)
        return 1
    pages = [p for p in all_pages if args.pages is None or p.stem in args.pages]
    shots = args.screenshots or root.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    server = serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    blocked = []

    def route(r):
        if is_local(r.request.url):
            return r.continue_()
        blocked.append(r.request.url)  # nothing outside the build is answered, not even a CDN
        return r.abort("blockedbyclient")

    failures = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for path in pages:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.route("**/*", route)
            page = context.new_page()
            blocked.clear()
            url = f"{base}/{path.relative_to(root).as_posix()}"
            problems, n_math = check_page(page, url, n_chapters=len(all_pages))
            problems += [f"tried to reach the network: {u}" for u in dict.fromkeys(blocked)]
            page.screenshot(path=str(shots / f"{path.stem}.png"), full_page=True)
            status = "ok" if not problems else "FAIL"
            print(f"check_pages: {status:4} {path.relative_to(root)} ({n_math} math elements)")
            for prob in dict.fromkeys(problems):
                print(f"    {prob}")
            failures += bool(problems)
            context.close()
        browser.close()
    server.shutdown()
    print(f"check_pages: {len(pages)} pages, {failures} failed; screenshots in {shots}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
