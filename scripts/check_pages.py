"""Open every page of the built book in headless Chromium and check it as a reader would.

    python scripts/check_pages.py _build/html [--screenshots DIR]

The book is served from localhost; every other request is blocked, except MathJax's CDN
address, which is answered from the copy in the `django-static-mathjax` package (the
published book keeps the CDN). A page fails on: a console error or page error, a failed
or >= 400 local request, an attempt to reach the network, an image that did not load,
missing navigation, or math that MathJax did not render.
"""
import argparse
import functools
import http.server
import mimetypes
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def mathjax_root():
    import mathjax  # the django-static-mathjax package: MathJax 3 as static files
    return Path(mathjax.__file__).parent / "static" / "mathjax"


def serve(root):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def check_page(page, url, n_chapters):
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
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
    # math: every math element rendered by MathJax
    n_math = page.locator(".math").count()
    if n_math:
        try:
            page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                                   timeout=20000)
            page.evaluate("() => MathJax.startup.promise")
        except Exception as e:  # noqa: BLE001
            problems.append(f"MathJax did not start: {e}")
        unrendered = page.evaluate("""() => [...document.querySelectorAll('.math')]
            .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60))""")
        problems += [f"math not rendered: {t!r}" for t in unrendered]
    return problems, n_math


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("html", type=Path)
    ap.add_argument("--screenshots", type=Path, default=None)
    args = ap.parse_args(argv)
    root = args.html.resolve()
    pages = sorted((root / "book").glob("*.html"))
    if not pages:
        print(f"check_pages: no pages under {root}/book", file=sys.stderr)
        return 1
    shots = args.screenshots or root.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    mj = mathjax_root()
    server = serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    blocked = []

    def route(r):
        url = urlparse(r.request.url)
        if url.hostname in ("127.0.0.1", "localhost"):
            return r.continue_()
        if "mathjax@3/" in url.path:  # https://cdn.jsdelivr.net/npm/mathjax@3/es5/...
            local = mj / url.path.split("mathjax@3/", 1)[1]
            if local.is_file():
                ctype = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
                return r.fulfill(status=200, body=local.read_bytes(), content_type=ctype)
        blocked.append(r.request.url)
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
            problems, n_math = check_page(page, url, n_chapters=len(pages))
            problems += [f"tried to reach the network: {u}" for u in blocked]
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
