"""The course in a real browser: `make test-browser` runs this after `make slides`.

Two checks, in headless Chromium driven by Playwright (Debian's `chromium`, launched
through `executable_path`, so Playwright downloads no browser of its own):

1. The JupyterLab walkthrough. JupyterLab starts on a free port; the chosen chapters
   open in it, their outputs are cleared and they run with Run > Run All Cells, as a
   learner would. The run fails on any error output, on a cell that never finishes and
   on a dead kernel. Where the chapter has interactive figures (`qlora_lab.explore`),
   the first knob of each is moved with the keyboard, as a learner would move it, and
   the printed numbers and the figure must change. Then View > Render as Reveal
   Slideshow must show the chapter as slides (jupyterlab-rise, the live slideshow).
2. The decks. Every `slides/*.slides.html` opens from the file system with every
   network request refused. Every slide must show something, draw its formulas and
   images, and fit 1280 x 720 (the deck's configured size, read from reveal.js).

Screenshots of both go to tests/browser/screenshots/ (git-ignored). The script is not
a pytest module (its name does not start with `test_`), so `make test` does not run it.

    .venv/bin/python tests/browser/browser_walkthrough.py                      # everything
    .venv/bin/python tests/browser/browser_walkthrough.py --decks-only
    .venv/bin/python tests/browser/browser_walkthrough.py --lab 00_welcome.ipynb --lab-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
CHROMIUM = "/usr/bin/chromium"
# Root in a container, no network: no sandbox, no GPU, nothing that phones home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Chapter 00 and two chapters that run in well under a minute, each with an interactive figure.
DEFAULT_LAB_NOTEBOOKS = ["00_welcome.ipynb", "01_numbers_and_int8.ipynb", "04_lora.ipynb"]
NOTEBOOK_TIMEOUT_S = 600


@dataclass
class Failures:
    messages: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.messages.append(message)
        print(f"  FAIL {message}", flush=True)


# --------------------------------------------------------------------------- decks

MEASURE_SLIDE = """(slide) => {
  const config = Reveal.getConfig();
  const images = [...slide.querySelectorAll("img")];
  const markdownText = [...slide.querySelectorAll(".jp-RenderedMarkdown")].map((md) => {
    const copy = md.cloneNode(true);
    copy.querySelectorAll("code, pre, mjx-container").forEach((e) => e.remove());
    return copy.textContent;
  }).join(" ");
  const wide = [...slide.querySelectorAll("pre, table, img, mjx-container")]
    .filter((e) => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== "visible");
  return {
    width: config.width, height: config.height,
    scrollWidth: slide.scrollWidth, scrollHeight: slide.scrollHeight,
    text: slide.innerText.trim().length, images: images.length,
    brokenImages: images.filter((i) => !i.complete || i.naturalWidth === 0).length,
    math: slide.querySelectorAll("mjx-container").length,
    mathErrors: slide.querySelectorAll("mjx-merror, [data-mjx-error]").length,
    rawMath: /\\$[^$\\s][^$]*\\$/.test(markdownText),
    clipped: wide.length,
    title: (slide.querySelector("h1, h2, h3, p") || {innerText: ""}).innerText.slice(0, 60),
  };
}"""


def check_deck(browser, deck: Path, failures: Failures, shots: Path) -> int:
    """Opens one deck offline, visits every slide; returns the number of slides."""
    context = browser.new_context(viewport={"width": 1280, "height": 720}, offline=True)
    blocked: list[str] = []

    def refuse_remote(route):
        url = route.request.url
        if url.startswith(("file:", "data:", "blob:", "about:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", refuse_remote)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("requestfailed", lambda request: request.url in blocked
            or errors.append(f"could not load {request.url}"))
    page.goto(deck.as_uri())
    try:
        page.wait_for_function("() => window.Reveal && Reveal.isReady()", timeout=30_000)
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                               timeout=30_000)
        page.evaluate("() => MathJax.startup.promise")
    except Exception as error:  # noqa: BLE001  (Playwright's timeout)
        failures.add(f"{deck.name}: reveal.js or MathJax did not start ({errors or error})")
        context.close()
        return 0
    page.evaluate("() => Reveal.configure({transition: 'none', backgroundTransition: 'none'})")
    page.add_style_tag(content=".reveal .slides section .fragment { transition: none !important; }")
    count = page.evaluate("() => Reveal.getSlides().length")
    for i in range(count):
        # Every fragment shown: the slide as it looks at its fullest.
        indices = page.evaluate(f"() => {{ const s = Reveal.getSlides()[{i}]; const ix = Reveal.getIndices(s);"
                                f" Reveal.slide(ix.h, ix.v, s.querySelectorAll('.fragment').length - 1);"
                                f" return ix; }}")
        page.wait_for_timeout(30)
        slide = page.evaluate_handle("() => Reveal.getCurrentSlide()")
        m = page.evaluate(MEASURE_SLIDE, slide)
        where = f"{deck.name} slide {i + 1}/{count} (#/{indices['h']}/{indices.get('v') or 0}, {m['title']!r})"
        if m["text"] == 0 and m["images"] == 0 and m["math"] == 0:
            failures.add(f"{where}: the slide is empty")
        if m["scrollHeight"] > m["height"] or m["scrollWidth"] > m["width"]:
            failures.add(f"{where}: {m['scrollWidth']} x {m['scrollHeight']} does not fit {m['width']} x {m['height']}")
        if m["clipped"]:
            failures.add(f"{where}: {m['clipped']} element(s) wider than the slide, cut off")
        if m["brokenImages"]:
            failures.add(f"{where}: {m['brokenImages']} image(s) did not load")
        if m["mathErrors"] or m["rawMath"]:
            failures.add(f"{where}: a formula did not render")
        page.screenshot(path=str(shots / f"{deck.stem.replace('.slides', '')}-{i + 1:03d}.png"))
    for url in blocked:
        failures.add(f"{deck.name}: asked the network for {url}")
    for error in errors:
        failures.add(f"{deck.name}: {error}")
    context.close()
    return count


def check_decks(browser, decks: list[Path], failures: Failures) -> None:
    if not decks:
        failures.add("no deck found in slides/: run `make slides` first")
        return
    shots = SCREENSHOTS / "decks"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    total = 0
    for deck in decks:
        before = len(failures.messages)
        started = time.monotonic()
        n = check_deck(browser, deck.resolve(), failures, shots)
        total += n
        status = "ok" if len(failures.messages) == before else "FAILED"
        print(f"deck {deck.name}: {n} slides, {time.monotonic() - started:.0f} s, {status}", flush=True)
    print(f"decks: {len(decks)} decks, {total} slides, screenshots in {shots.relative_to(ROOT)}", flush=True)


# ------------------------------------------------------------------ JupyterLab

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(scratch: Path, port: int, token: str) -> subprocess.Popen:
    """JupyterLab on a copy of notebooks/ (JupyterLab saves what it runs, and the committed
    notebooks must not change), with its own configuration, workspaces and runtime
    folders, and nothing that would reach for the network."""
    command = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}",
               "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
               f"--notebook-dir={scratch / 'notebooks'}", "--LabApp.news_url=",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        command.append("--allow-root")  # as the Makefile's ROOT_FLAG does
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(scratch / "config"), JUPYTER_RUNTIME_DIR=str(scratch / "runtime"))
    log = open(scratch / "jupyterlab.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited at start:\n{(scratch / 'jupyterlab.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"JupyterLab did not answer on port {port} within 120 s")


def api(port: int, token: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}?token={token}", method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else None


# The visible notebook: its code cells' prompts ("[3]:" run, "[*]:" queued or running,
# "[ ]:" not run), the kernel status of its toolbar, and the tracebacks it shows.
NOTEBOOK_STATE = """() => {
  const panel = [...document.querySelectorAll(".jp-NotebookPanel")].find((p) => p.offsetParent !== null);
  if (!panel) return null;
  const prompts = [...panel.querySelectorAll(".jp-CodeCell .jp-InputPrompt")].map((p) => p.textContent.trim());
  const indicator = panel.querySelector(".jp-Notebook-ExecutionIndicator");
  const tracebacks = [...panel.querySelectorAll(".jp-OutputArea-output")]
    .filter((o) => o.textContent.includes("Traceback (most recent call last)")).length;
  return {
    cells: prompts.length,
    run: prompts.filter((p) => /\\[\\d+\\]/.test(p)).length,
    waiting: prompts.filter((p) => p.includes("*")).length,
    status: indicator ? indicator.dataset.status : "unknown",
    tracebacks,
    dialog: (document.querySelector(".jp-Dialog") || {innerText: ""}).innerText.slice(0, 200),
  };
}"""


def menu(page, title: str, command: str) -> None:
    """Clicks a command in one of JupyterLab's menus (again if a busy machine let the menu
    close before the click). A dialog in the way is a failure: it says what went wrong."""
    item = page.locator(f"li.lm-Menu-item[data-command='{command}']")
    for _ in range(5):
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            raise RuntimeError(f"a JupyterLab dialog is open: {dialog.first.inner_text()[:300]!r}")
        try:
            page.locator(".lm-MenuBar-item", has_text=title).first.click(timeout=10_000)
            item.wait_for(state="visible", timeout=5_000)
            item.click(timeout=5_000)
            return
        except Exception:  # noqa: BLE001  (Playwright's timeout; try again)
            page.keyboard.press("Escape")
    raise RuntimeError(f"could not click {title} > {command}")


def run_notebook_in_lab(page, port: int, token: str, name: str, scratch: Path, failures: Failures,
                        shots: Path) -> None:
    """Opens a notebook in a fresh JupyterLab workspace, clears its outputs, runs Run > Run
    All Cells, waits until every cell has run, saves with File > Save Notebook and checks
    the saved file too."""
    started = time.monotonic()
    page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}?reset&token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=120_000)
    page.wait_for_function("() => { const i = document.querySelector('.jp-Notebook-ExecutionIndicator');"
                           " return i && i.dataset.status === 'idle'; }", timeout=120_000)
    # As a learner would: Edit > Clear Outputs of All Cells, then Run > Run All Cells.
    menu(page, "Edit", "editmenu:clear-all")
    page.wait_for_function(f"() => ({NOTEBOOK_STATE})().run === 0", timeout=30_000)
    menu(page, "Run", "runmenu:run-all")
    state, seen = None, set()
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    while True:
        page.wait_for_timeout(1000)
        state = page.evaluate(NOTEBOOK_STATE)
        if state is None:
            continue
        seen.add(state["status"])
        kernels = api(port, token, "kernels")
        if seen & {"dead", "autorestarting", "restarting"} or any(k["execution_state"] == "dead" for k in kernels) \
                or "died" in state["dialog"]:
            failures.add(f"{name}: the kernel died ({state['status']}; {state['dialog']!r})")
            break
        if state["run"] == state["cells"] and state["waiting"] == 0 and state["status"] == "idle":
            break
        if time.monotonic() > deadline:
            failures.add(f"{name}: not finished after {NOTEBOOK_TIMEOUT_S} s: {state['run']} of "
                         f"{state['cells']} code cells run")
            break
    page.screenshot(path=str(shots / f"{Path(name).stem}.png"))
    if state and state["tracebacks"]:
        failures.add(f"{name}: {state['tracebacks']} output(s) show an error")
    # File > Save Notebook, then read what JupyterLab wrote: every code cell run, no error output.
    menu(page, "File", "docmanager:save")
    page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')", timeout=30_000)
    saved = json.loads((scratch / "notebooks" / name).read_text())
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    for output in errors:
        failures.add(f"{name}: {output.get('ename')}: {output.get('evalue', '')[:200]}")
    not_run = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    if not_run and not any(name in m for m in failures.messages):
        failures.add(f"{name}: code cells {not_run} were not run")
    moved = move_knobs(page, name, saved, failures, shots)
    check_rise(page, name, saved, failures, shots)
    print(f"lab {name}: {len(code) - len(not_run)} of {len(code)} code cells run through the UI, "
          f"{len(errors)} errors, {moved} interactive figure(s) moved, {time.monotonic() - started:.0f} s", flush=True)


# The interactive figures of the visible notebook: per explorer, its printed numbers and its image.
EXPLORERS = """() => {
  const panel = [...document.querySelectorAll(".jp-NotebookPanel")].find((p) => p.offsetParent !== null);
  return [...panel.querySelectorAll(".qlora-lab-explorer")].map((box) => ({
    text: (box.querySelector(".widget-html pre") || {textContent: ""}).textContent,
    image: (() => { const src = (box.querySelector("img") || {src: ""}).src || "";
                    return src ? `${src.length}:${src.slice(-120)}` : ""; })(),  // enough to tell two PNGs apart
    sliders: box.querySelectorAll(".noUi-handle").length,
  }));
}"""


def move_knobs(page, name: str, saved: dict, failures: Failures, shots: Path) -> int:
    """Every explorer the notebook shows: move its first slider one step (right, or left if it
    starts at its end) and wait until its numbers and its figure change. Returns how many explorers changed."""
    expected = sum("widgets.explore(" in "".join(c["source"]) for c in saved["cells"] if c["cell_type"] == "code")
    before = page.evaluate(EXPLORERS)
    if len(before) != expected or any(not b["text"] or not b["image"] or not b["sliders"] for b in before):
        failures.add(f"{name}: {expected} explorer cell(s), the page shows {before}")
        return 0
    changed = 0
    for i, old in enumerate(before):
        box = page.locator(".jp-NotebookPanel:visible .qlora-lab-explorer").nth(i)
        box.scroll_into_view_if_needed()
        handle = box.locator(".noUi-handle").first
        handle.focus()
        # A slider that starts at its last value (chapter 01's bits, at 8) can only move left.
        at_end = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
        handle.press("ArrowLeft" if at_end else "ArrowRight")
        try:
            page.wait_for_function(f"() => {{ const now = ({EXPLORERS})()[{i}];"
                                   f" return now && now.text !== {json.dumps(old['text'])}"
                                   f" && now.image !== {json.dumps(old['image'])}; }}", timeout=60_000)
        except Exception:  # noqa: BLE001  (Playwright's timeout)
            failures.add(f"{name}: explorer {i + 1}: moving its first slider did not change both its numbers"
                         f" and its figure ({old['text']!r})")
            continue
        page.wait_for_timeout(500)
        now = page.evaluate(EXPLORERS)[i]
        page.screenshot(path=str(shots / f"{Path(name).stem}-explorer-{i + 1}.png"))
        print(f"lab {name}: explorer {i + 1}: {old['text'][:70]!r} -> {now['text'][:70]!r}", flush=True)
        changed += 1
    return changed


def check_rise(page, name: str, saved: dict, failures: Failures, shots: Path) -> None:
    """View > Render as Reveal Slideshow: jupyterlab-rise must show the notebook as slides,
    one reveal.js section per slide and subslide of the notebook's metadata."""
    kinds = [c.get("metadata", {}).get("slideshow", {}).get("slide_type") for c in saved["cells"]]
    slides, subslides = kinds.count("slide"), kinds.count("subslide")
    menu(page, "View", "RISE:preview")
    found = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        frames = [f for f in page.frames if "/rise/" in f.url]
        try:
            found = frames[0].evaluate("() => [document.querySelectorAll('.reveal .slides > section').length,"
                                       " document.querySelectorAll('.reveal .slides section').length]")
        except Exception:  # noqa: BLE001  (no frame yet, or it is loading)
            continue
        if found[0]:
            break
    page.screenshot(path=str(shots / f"{Path(name).stem}-rise.png"))
    # Every slide is a <section> holding one <section> per vertical slide (itself and its subslides).
    if found != [slides, 2 * slides + subslides]:
        failures.add(f"{name}: View > Render as Reveal Slideshow shows {found} sections, "
                     f"the notebook has {slides} slides and {subslides} subslides")


def check_lab(browser, notebooks: list[str], failures: Failures) -> None:
    shots = SCREENSHOTS / "lab"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    scratch = Path(tempfile.mkdtemp(prefix="qlora-lab-browser-"))
    shutil.copytree(ROOT / "notebooks", scratch / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs"))
    port, token = free_port(), os.urandom(16).hex()
    server = start_lab(scratch, port, token)
    try:
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        page = context.new_page()
        for name in notebooks:
            try:
                run_notebook_in_lab(page, port, token, name, scratch, failures, shots)
            except Exception as error:  # noqa: BLE001  (report it, go on with the next notebook)
                page.screenshot(path=str(shots / f"{Path(name).stem}-failed.png"))
                failures.add(f"{name}: {type(error).__name__}: {str(error)[:500]}")
            for kernel in api(port, token, "kernels"):
                api(port, token, f"kernels/{kernel['id']}", method="DELETE")
        context.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the course's notebooks and decks in headless Chromium")
    parser.add_argument("--lab", action="append", metavar="NOTEBOOK",
                        help=f"a notebook of notebooks/ to run in JupyterLab (default: {DEFAULT_LAB_NOTEBOOKS})")
    parser.add_argument("--decks", type=Path, default=ROOT / "slides", help="the folder of the decks")
    parser.add_argument("--deck", action="append", type=Path, help="check only this deck (repeatable)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--decks-only", action="store_true")
    only.add_argument("--lab-only", action="store_true")
    args = parser.parse_args(argv)

    if not os.access(CHROMIUM, os.X_OK):
        print(f"make test-browser needs Chromium at {CHROMIUM} (Debian's `chromium` package)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    # A CI timeout sends SIGTERM: unwind, so that JupyterLab, its kernels and Chromium stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failures = Failures()
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            if not args.decks_only:
                check_lab(browser, args.lab or DEFAULT_LAB_NOTEBOOKS, failures)
            if not args.lab_only:
                check_decks(browser, args.deck or sorted(args.decks.glob("*.slides.html")), failures)
        finally:
            browser.close()
    print(f"browser checks: {len(failures.messages)} failure(s), {time.monotonic() - started:.0f} s")
    return 1 if failures.messages else 0


if __name__ == "__main__":
    sys.exit(main())
