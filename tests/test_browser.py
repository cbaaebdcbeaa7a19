"""The dashboard in a real browser: ``streamlit run app.py`` as a subprocess, driven by headless
Debian Chromium through the playwright package (no ``playwright install``; skipped without
/usr/bin/chromium). The server is pointed at a copy of the tiny run whose text cleaning is off,
so typed ``<script>`` and ``<b>`` reach the tokens and must show as literal text.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from core.files import write_json
from core.runfolder import read_json
from bench.dashboard import CHROMIUM, CHROMIUM_ARGS, streamlit_server

EVIL_TEXT = "<script>alert(1)</script> <b>x</b> the acting was terrible"
ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (/usr/bin/chromium); scripts/test.sh installs it")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


@pytest.fixture(scope="module")
def browser_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with the dataset's text cleaning switched off."""
    run = tmp_path_factory.mktemp("browser") / "raw"
    shutil.copytree(tiny_run.root, run)
    m = read_json(run / "manifest.json")
    m["config"]["data"].update(remove_html=False, remove_punctuation=False, remove_special=False)
    write_json(run / "manifest.json", m)
    return run


@pytest.fixture(scope="module")
def server(browser_run, tmp_path_factory):
    """``streamlit run app.py`` on a free port; always stopped at the end."""
    with streamlit_server(browser_run, tmp_path_factory.mktemp("server") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    """A 1366x768 Chromium page; JavaScript dialogs are recorded (an alert would mean injected
    script ran), and so is every request that leaves the local server (the dashboard works offline:
    a page icon from Google's font servers was one such request, and a failed one)."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1366, "height": 768})
            pg.dialogs, pg.external = [], []
            pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
            pg.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else pg.external.append(r.url))
            yield pg
        finally:
            browser.close()


def tick_texts(pg) -> list[str]:
    return pg.eval_on_selector_all(".js-plotly-plot .xtick text", "els => els.map(e => e.textContent)")


def assert_no_errors(pg) -> None:
    assert pg.locator(ERRORS).count() == 0, pg.locator(ERRORS).all_inner_texts()
    assert pg.dialogs == []
    assert pg.external == [], pg.external


def test_sentence_explorer_in_a_browser(server, page, tmp_path, tiny_run):
    page.goto(f"{server}/explorer", timeout=90_000)
    box = page.get_by_label("Sentence (press Enter)")
    box.wait_for(timeout=90_000)
    page.wait_for_selector(".js-plotly-plot", timeout=90_000)
    assert "brilliant" in tick_texts(page)
    box.fill(EVIL_TEXT)
    box.press("Enter")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.js-plotly-plot .xtick text')].some(e => e.textContent === 'terrible')",
        timeout=90_000,
    )
    page.wait_for_timeout(1500)
    ticks = tick_texts(page)
    assert "<" in ticks and "script" in ticks and "alert" in ticks  # '<' shown as a literal token
    assert page.locator(".js-plotly-plot script, .js-plotly-plot b").count() == 0
    assert page.locator(".js-plotly-plot").count() == 1  # one chart: the cosine map above the SAE panels
    rows = page.eval_on_selector_all(".js-plotly-plot .yaxislayer-above text", "els => els.map(e => e.textContent)")
    assert "emb" in rows and "pre-trained" in rows and "fine-tuned −pre-trained" in rows, rows  # the difference row: two lines
    assert page.get_by_text("Prediction:").count() >= 1
    assert_no_errors(page)
    # the address bar now links to this view: opened afresh, it shows the same sentence, escaped
    from urllib.parse import parse_qs, urlparse

    link = page.url
    assert parse_qs(urlparse(link).query)["text"] == [EVIL_TEXT]
    page.goto("about:blank")
    page.goto(link, timeout=90_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.js-plotly-plot .xtick text')].some(e => e.textContent === 'terrible')",
        timeout=90_000,
    )
    assert page.get_by_label("Sentence (press Enter)").input_value() == EVIL_TEXT and not page.dialogs
    page.screenshot(path=str(tmp_path / "explorer.png"))
    assert (tmp_path / "explorer.png").stat().st_size > 10_000
    # the match chart below: its token columns line up with the main chart's (each sized its own
    # margins before: its heatmap started ~35 px left of the main one's and ended ~26 px right)
    page.get_by_text("Show match").click()
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length === 2", timeout=90_000)
    page.wait_for_timeout(1500)
    edges = page.evaluate(
        """() => [...document.querySelectorAll('.js-plotly-plot')].map(p => {
             const box = p.querySelector('.nsewdrag').getBoundingClientRect();
             return [Math.round(box.left), Math.round(box.right)];
           })"""
    )
    assert len(edges) == 2 and edges[0] == edges[1] and edges[0][1] - edges[0][0] > 300, edges
    page.get_by_text("Show match").click()
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length === 1", timeout=90_000)
    # two sentences side by side: each chart's title and subtitle fit its half of the page (Plotly
    # cuts a title at the chart's edge; it was cut after "on eac" here before titles wrapped)
    page.get_by_text("Compare").click()
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length === 2", timeout=90_000)
    page.wait_for_timeout(1500)
    past_edge = page.evaluate(
        """() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(p => {
             const edge = p.getBoundingClientRect().right;
             return [...p.querySelectorAll('.g-gtitle text, .g-gtitle tspan')]
               .filter(t => t.getBoundingClientRect().right > edge + 1).map(t => t.textContent);
           })"""
    )
    assert page.locator(".g-gtitle tspan").count() >= 4 and past_edge == [], past_edge  # wrapped lines, none cut
    assert_no_errors(page)


def test_overview_similarity_and_feature_browser_in_a_browser(server, page, tmp_path):
    page.goto(f"{server}/features", timeout=90_000)
    page.wait_for_selector(".js-plotly-plot", timeout=90_000)
    page.wait_for_timeout(1000)
    assert_no_errors(page)
    # every metric tile of the feature card shows its whole value (with a class name beside four
    # numbers, 0.2042 showed as "0.20..." on the default run)
    cut = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stMetricValue"] *')]
                             .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)""")
    assert page.locator('[data-testid="stMetricValue"]').count() >= 4 and cut == [], cut
    for path, expected in (("", 5), ("similarity", 2)):
        page.goto(f"{server}/{path}", timeout=90_000)
        page.wait_for_selector(".js-plotly-plot", timeout=90_000)
        page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot').length >= {expected}", timeout=60_000)
        assert_no_errors(page)
        page.screenshot(path=str(tmp_path / f"{path or 'overview'}.png"))
    # the similarity page's measure pills all show: none cut off by the edge of their group (they
    # sat in a third of the page, where the last one was scrolled out of sight)
    overflow = page.evaluate(
        """() => [...document.querySelectorAll('[data-testid="stButtonGroup"]')].flatMap(g => {
             const edge = g.getBoundingClientRect().right;
             return [...g.querySelectorAll('button')].filter(b => b.getBoundingClientRect().right > edge + 1).map(b => b.textContent.trim());
           })"""
    )
    assert page.get_by_role("button", name="linear CKA").count() == 1 and overflow == [], overflow
