"""Dashboard: Enter-to-update time of the sentence explorer in a real browser, against the forward passes it needs.

``streamlit run app.py`` serves the bench run (embedded MiniLM as both models, 12 TopK SAEs of
1,536 latents, k=32: the default run's shapes). Headless Debian Chromium (playwright, no
``playwright install``) opens the explorer, then for each sentence types it, presses Enter and
waits until the token heatmap shows the new sentence and Streamlit has no stale element left. The
time runs from the key press to the first animation frame where that holds, measured in the
page (``performance.now()``), so it covers the websocket round trip, the script rerun (both
forward passes, the encodes of the SAE on screen, building and sending the sentence's one Plotly
figure) and Plotly drawing it. Every sentence is new to the server: each one is a cache miss.

Sentences: real IMDb review prefixes of exactly 16 and 64 tokens (specials included), each with
a marker word up front so the update can be recognised. Baseline: the two bare forward passes
(``output_hidden_states=True``) on the same tokens, timed in this process. Targets: at most
300 ms at 64 tokens (the dashboard issue), and the ratio to the forward passes is reported.

Skipped with a note when ``/usr/bin/chromium`` or the playwright package is missing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from bench.common import ROOT, Context, Section, bench_run, median, timeit

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
MARKERS = ["zebra", "violin", "harbor", "meadow", "candle", "pirate", "glacier", "tractor", "walrus", "lantern", "dolphin", "compass"]
# the sentence's chart (cosine map, feature, top features on one token axis) is drawn with the
# marker as its first word (position 1 of the token axis, whose labels plotly.js thins to the
# chart's width, so the word itself may be unlabelled) and no element is stale (the rerun finished)
UPDATED_JS = """(marker) => {
  if (document.querySelector('[data-stale="true"]')) return false;  // cheap test first: polled every frame
  const plots = [...document.querySelectorAll('.js-plotly-plot')];
  const withMarker = plots.filter(p => ((p.layout || {}).xaxis || {}).labelalias?.['1'] === marker && p.querySelector('.xtick text'));
  return withMarker.length >= 1 ? performance.now() : false;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Poll Streamlit's health endpoint until it answers (or the server dies / time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"streamlit did not answer within {timeout} s:\n{log.read_text()}")


@contextlib.contextmanager
def streamlit_server(run_path: Path, log: Path, checkpoints: Path | None = None):
    """``streamlit run app.py`` on a free local port showing ``run_path``; yields its URL, always stopped."""
    port = free_port()
    env = {**os.environ, "LAYERSCOPE_RUN": str(run_path), "LAYERSCOPE_CHECKPOINTS": str(checkpoints or run_path.parent / "none"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def marked_texts(tokenizer, reviews: list[str], n_tokens: int, count: int, mc: dict) -> list[str]:
    """``count`` review prefixes of exactly ``n_tokens`` tokens, each starting with its own marker word."""
    from core.models import encode

    out = []
    for marker, review in zip(MARKERS, reviews[::3]):
        words = review.split()
        for i in range(1, len(words) + 1):
            text = " ".join([marker, *words[:i]])
            n = len(encode(tokenizer, [text], mc["max_length"], mc["truncation"])[0])
            if n == n_tokens:
                out.append(text)
                break
            if n > n_tokens:
                break
        if len(out) == count:
            return out
    raise RuntimeError(f"found only {len(out)} review prefixes of {n_tokens} tokens")


def run(ctx: Context) -> Section:
    from core.analysis import load_bundle
    from core.data import load_split
    from core.models import encode

    sec = Section("dashboard", __doc__.split("\n\n")[0])
    if not CHROMIUM.exists():
        sec.notes.append("skipped: /usr/bin/chromium is missing (scripts/test.sh installs it)")
        return sec
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sec.notes.append("skipped: the playwright package is not installed (scripts/setup.sh --dev)")
        return sec
    from bench.analysis import ensure_saes

    run_ = bench_run(ctx, ctx.pick(21000, 300))
    ensure_saes(run_)
    bundle = load_bundle(run_)
    mc = bundle.config["model"]
    reviews = load_split(run_, "test")["text"].tolist()[:200]
    per_size = ctx.pick(5, 2)
    details: dict = {"sentences_per_size": per_size}
    log = ctx.work / "dashboard_streamlit.log"
    with streamlit_server(run_.root, log) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            t0 = time.perf_counter()
            page.goto(f"{url}/explorer", timeout=120_000)
            box = page.get_by_label("Sentence (press Enter)")
            box.wait_for(timeout=120_000)
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 1", timeout=120_000)
            details["first_explorer_page_s"] = time.perf_counter() - t0
            for n_tokens in (16, 64):
                texts = marked_texts(bundle.tokenizer, reviews, n_tokens, per_size + 1, mc)
                times = []
                for i, text in enumerate(texts):
                    marker = text.split()[0]
                    box.fill(text)
                    start = page.evaluate("() => performance.now()")
                    box.press("Enter")
                    done = page.wait_for_function(UPDATED_JS, arg=marker, polling="raf", timeout=60_000).json_value()
                    if i:  # the first sentence of each size warms up
                        times.append((done - start) / 1e3)
                ids = torch.tensor([encode(bundle.tokenizer, [texts[-1]], mc["max_length"], mc["truncation"])[0]])

                @torch.no_grad()
                def bare(ids=ids):
                    for model in bundle.models.values():
                        model(input_ids=ids, output_hidden_states=True)

                base = timeit(bare, repeats=ctx.pick(20, 3), warmup=3).median
                value = median(times)
                sec.add(f"Enter to updated explorer in Chromium, {n_tokens} tokens", value * 1e3, "ms", base * 1e3, "two bare forward passes", target="value <= 300" if n_tokens == 64 else None)
                details[f"{n_tokens}_tokens"] = {"enter_to_update_ms": [t * 1e3 for t in times], "bare_forward_ms": base * 1e3, "texts": texts}
        finally:
            browser.close()
    sec.details = details
    return sec
