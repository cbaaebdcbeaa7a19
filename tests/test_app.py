"""The dashboard through ``streamlit.testing.v1.AppTest`` against copies of the tiny run.

The app is pointed at a run with ``LAYERSCOPE_RUN`` (or ``?run=``) and searches
``LAYERSCOPE_CHECKPOINTS`` for the run picker. Three copies of the session's tiny run are used:
``checkpoints/tiny`` and ``checkpoints/other`` (its similarity numbers halved, so overlays differ),
and ``evil`` (HTML in its dataset name and text cleaning switched off, so ``<`` and ``>`` reach
the tokens). Tests of SAE content skip while the tiny run has no SAEs / feature statistics.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core import plots
from core.report import build_report
from core.features_step import load_stats
from core.files import write_json
from core.runfolder import RunFolder, read_json
from pages import _background as background
from pages import _cached as cached
from pages import _keys as keys
from pages import _selection as selection
from pages import _shared as shared
from tests.conftest import ROOT, tiny_overrides

EVIL_TEXT = "<script>alert(1)</script> <b>x</b>"
EXPLORER, FEATURES, SIMILARITY = "pages/explorer.py", "pages/features.py", "pages/similarity.py"


# ----------------------------------------------------------------------------- fixtures
def _copy_run(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        m = read_json(dst / "manifest.json")
        edit(m, dst)
        write_json(dst / "manifest.json", m)
    return dst


def _halve_similarity(m: dict, root: Path) -> None:
    m["config"]["data"]["dataset"] = "other.csv"
    path = root / "similarity" / "similarity.json"
    sim = read_json(path)
    for row in sim["layers"]:
        for k in ("cosine_of_means", "mean_cosine", "token_cosine", "cka"):
            row[k] *= 0.5
    write_json(path, sim)


def _make_evil(m: dict, root: Path) -> None:
    m["config"]["data"].update(dataset="<script>alert(1)</script>.csv", remove_html=False, remove_punctuation=False, remove_special=False)


@pytest.fixture(scope="session")
def runs(tiny_run, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dashboard")
    ckpt = base / "checkpoints"
    return {
        "checkpoints": ckpt,
        "tiny": _copy_run(tiny_run.root, ckpt / "tiny"),
        "other": _copy_run(tiny_run.root, ckpt / "other", _halve_similarity),
        "evil": _copy_run(tiny_run.root, base / "elsewhere" / "evil", _make_evil),
    }


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    _stop_builds()
    st.cache_data.clear()
    st.cache_resource.clear()


def _stop_builds() -> None:
    for entry in list(background._builds().values()):
        if entry["process"].poll() is None:
            entry["process"].kill()
            entry["process"].wait(30)


@pytest.fixture
def app(monkeypatch, runs):
    """``app(run=PATH | None, checkpoints=DIR)`` -> an AppTest of app.py with that environment."""

    def make(run: Path | None = runs["tiny"], checkpoints: Path = runs["checkpoints"], query: str | None = None) -> AppTest:
        monkeypatch.setenv("LAYERSCOPE_CHECKPOINTS", str(checkpoints))
        if run is None:
            monkeypatch.delenv("LAYERSCOPE_RUN", raising=False)
        else:
            monkeypatch.setenv("LAYERSCOPE_RUN", str(run))
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
        if query:
            at.query_params["run"] = query
        return at

    return make


@pytest.fixture
def sae_run(tiny_run):
    assert tiny_run.is_done("saes")
    return tiny_run


@pytest.fixture
def features_run(tiny_run):
    assert tiny_run.is_done("features")
    return tiny_run


# ----------------------------------------------------------------------------- helpers
def charts(at: AppTest) -> list[dict]:
    """Every Plotly chart's figure, decoded (Plotly writes '<' as \\u003c in its JSON)."""
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def title(fig: dict) -> str:
    """A chart's title as one line (narrow charts wrap theirs with <br>)."""
    t = fig["layout"].get("title") or {}
    return (t.get("text", "") if isinstance(t, dict) else str(t)).replace("<br>", " ")


def subtitle(fig: dict) -> str:
    return fig["layout"]["title"]["subtitle"]["text"].replace("<br>", " ")


def chart(at: AppTest, fragment: str) -> dict:
    found = [f for f in charts(at) if fragment in title(f)]
    assert found, f"no chart titled like {fragment!r}; titles: {[title(f) for f in charts(at)]}"
    return found[0]


def array(z) -> np.ndarray:
    """A trace's ``z`` as an array: Plotly writes numpy arrays as base64 typed arrays
    (``{"dtype", "bdata", "shape"}``), plain lists as lists."""
    if isinstance(z, dict):
        shape = [int(n) for n in str(z.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape)
    return np.asarray(z, dtype=float)


def trace(fig: dict, name: str) -> dict:
    (found,) = [t for t in fig["data"] if t.get("name") == name]
    return found


# the explorer's one chart per sentence: cosine map, chosen feature, top features
SENTENCE = "Cosine per layer, and feature"


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def unescaped(markdown: str) -> str:
    """``markdown`` with its backslash escapes removed (the text a reader sees)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def texts(at: AppTest) -> str:
    """Every markdown/caption/text/code value on the page, joined."""
    parts = [e.value for kind in ("markdown", "caption", "text", "code", "title", "header", "subheader") for e in at.get(kind)]
    return unescaped("\n".join(str(p) for p in parts))


def xlabels(fig: dict) -> list[str]:
    """The tokens on a chart's token axis, in order (``labelalias`` of positions 0..T-1)."""
    alias = fig["layout"]["xaxis"]["labelalias"]
    return [alias[str(i)] for i in range(len(alias))]


def open_page(at: AppTest, page: str) -> AppTest:
    at.run()
    return at.switch_page(page).run()


# ----------------------------------------------------------------------------- pages render
def test_overview_shows_run_finetuning_and_claims(app, runs):
    at = app().run()
    assert_clean(at)
    figs = charts(at)
    assert len(figs) >= 5  # 2 classification bar charts + one figure per claim
    assert any("pre-trained (chance): scores per class" in title(f) for f in figs) and any("fine-tuned: scores per class" in title(f) for f in figs)
    bars = chart(at, "fine-tuned: scores per class")
    assert [t["name"] for t in bars["data"]] == ["precision", "recall", "F1"]
    page = texts(at)
    assert "Early layers stay general" in page and "Late layers specialise" in page and "Middle layers" in page
    # one verdict box per claim, each the verdict core.export computes from the run's numbers
    from core.export import HIGH_SIMILARITY, NOT_SUPPORTED, SUPPORTED, UNKNOWN, paper_claims
    from core.report import build_report

    box = {SUPPORTED: ("success", "Supported by this run"), NOT_SUPPORTED: ("warning", "Not supported by this run"), UNKNOWN: ("info", UNKNOWN.capitalize())}
    want = sorted(box[c["verdict"]] for c in paper_claims(build_report(RunFolder(runs["tiny"]))["similarity"], HIGH_SIMILARITY))
    shown = sorted((kind, e.value) for kind in ("success", "warning", "info") for e in at.get(kind) if (kind, e.value) in box.values())
    assert len(want) == 3 and shown == want
    assert [m.label for m in at.metric][:2] == ["Accuracy, pre-trained (chance)", "Accuracy, fine-tuned"]
    assert any(d.proto.label == "HTML report" for d in at.get("download_button"))
    assert at.session_state[keys.KEY_RUN] == str(runs["tiny"])



@pytest.mark.parametrize("damaged", ["finetune/metrics.json", "saes/finetuned/layer_1/metrics.json", "similarity/similarity.json"])
def test_a_damaged_file_costs_only_the_sections_that_read_it(app, sae_run, tmp_path, damaged):
    """The overview and the similarity page read one report of the run: a damaged file shows its
    message in the section that needs it, the other sections and the similarity figures stay."""
    run = _copy_run(sae_run.root, tmp_path / "run")
    (run / damaged).write_text("not json")
    at = app(run=run).run()
    assert not at.exception
    (box,) = at.error
    assert f"{run / damaged} is not valid JSON" in unescaped(box.value)
    page = texts(at)
    assert ("Early layers stay general" in page) == (damaged != "similarity/similarity.json")
    assert any("fine-tuned: scores per class" in title(f) for f in charts(at)) == (damaged != "finetune/metrics.json")
    assert any({"model", "layer", "fvu"} <= set(d.value.columns) for d in at.dataframe) != damaged.startswith("saes/")
    (button,) = [d for d in at.get("download_button") if d.proto.label == "HTML report"]
    assert button.proto.disabled and "needs every file of the run readable" in button.proto.help  # a click would fail with no word
    at.switch_page(SIMILARITY).run()
    if damaged == "similarity/similarity.json":
        assert len(at.error) == 1 and not charts(at)
    else:
        assert_clean(at)
        assert charts(at)
    (run / damaged).write_bytes((sae_run.root / damaged).read_bytes())  # put right by hand: the next rerun has it all
    at = app(run=run).run()
    assert_clean(at)
    assert not [d for d in at.get("download_button") if d.proto.label == "HTML report"][0].proto.disabled


def test_a_part_of_the_run_the_user_may_not_read_is_a_message_not_a_bug_box(app, monkeypatch):
    """PermissionError from any reader (a folder of the run with mode 000) names the path and the
    fix in the section that failed; the sidebar's step line and the run list skip what they cannot read."""
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/runs/r/similarity")

    monkeypatch.setattr(cached, "report", denied)
    at = app().run()
    assert not at.exception and not at.expander  # no "Something went wrong" box with a traceback
    assert any("cannot read /runs/r/similarity: permission denied" in unescaped(e.value) and "chmod u+rx" in e.value for e in at.error)


def test_the_run_list_skips_folders_it_cannot_read_and_lists_a_symlinked_run_once(runs, tmp_path, monkeypatch):
    base = tmp_path / "checkpoints"
    base.mkdir()
    (base / "real").symlink_to(runs["tiny"], target_is_directory=True)
    (base / "link").symlink_to(runs["tiny"], target_is_directory=True)
    (base / "locked").mkdir()
    real_exists = RunFolder.exists

    def exists(self):
        if self.root.name == "locked" or self.root.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(self.root / "manifest.json"))
        return real_exists(self)

    monkeypatch.setattr(RunFolder, "exists", exists)
    found = selection.discover_runs(base)
    assert found == [str(base / "link")]  # "real" reaches the same folder: listed once
    monkeypatch.setattr(RunFolder, "manifest", lambda self: exists(self))  # the manifest of a folder we may not enter
    assert selection.steps_line(str(base / "locked")) == "not a readable run"
    assert selection.same_folder(str(base / "real"), str(runs["tiny"]))



def test_an_sae_folder_gone_since_the_step_is_a_warning_above_the_others(app, sae_run, tmp_path):
    run = _copy_run(sae_run.root, tmp_path / "run")
    shutil.rmtree(run / "saes" / "finetuned" / "layer_1")
    at = app(run=run).run()
    assert not at.exception and not at.error
    assert any("finetuned layer 1 is missing" in unescaped(w.value) for w in at.warning)
    (table,) = [d.value for d in at.dataframe if {"model", "layer", "fvu"} <= set(d.value.columns)]
    assert len(table) == len(sae_run.sae_dirs()) - 1

def test_overview_warns_when_the_fine_tuned_classifier_recognises_one_class_only(app, sae_run, tmp_path):
    """A collapsed classifier (as on a small, imbalanced star-rating run): a warning above its
    report; the tiny run's own classifier gets none."""
    from sklearn.metrics import classification_report

    at = app().run()
    assert not [w for w in at.warning if "one class only" in w.value]
    run = _copy_run(sae_run.root, tmp_path / "collapsed")
    metrics = read_json(run / "finetune" / "metrics.json")
    names = list(read_json(run / "data" / "labels.json")["names"])
    collapsed = classification_report([0, 1, 1, 0], [1, 1, 1, 1], labels=[0, 1], target_names=names, output_dict=True, zero_division=0)
    metrics["finetuned"]["per_class"] = {n: collapsed[n] for n in names}  # what the finetune step keeps of it
    write_json(run / "finetune" / "metrics.json", metrics)
    at = app(run=run).run()
    assert_clean(at)
    (warning,) = [unescaped(w.value) for w in at.warning if "one class only" in w.value]
    assert f"recalls every test text of '{names[1]}' and no test text of any other class" in warning


def test_overview_claim_threshold_is_used(app):
    at = app().run()
    at.slider(key=keys.KEY_CLAIM_THRESHOLD).set_value(0.5).run()
    assert ">= 0.5)" in texts(at)
    at.slider(key=keys.KEY_CLAIM_THRESHOLD).set_value(1.0).run()
    assert ">= 1)" in texts(at)
    assert "Not supported by this run" in [w.value for w in at.warning]  # nothing stays at CKA 1 after fine-tuning
    assert_clean(at)


def test_overview_sae_table_when_saes_exist(app, sae_run):
    at = app().run()
    assert_clean(at)
    assert "Sparse autoencoders" in texts(at)
    frames = [d.value for d in at.dataframe]
    sae = [df for df in frames if {"model", "layer", "fvu", "l0"} <= set(df.columns)]
    assert sae and len(sae[0]) == len(sae_run.sae_dirs())
    # the rare-token split is flattened into columns, row by row from each SAE's metrics.json
    want = [json.loads((d / "metrics.json").read_text())["rare_tokens"]["error_share"] for _, _, d in sorted(sae_run.sae_dirs())]
    shown = sae[0].sort_values(["model", "layer"])["rare_error_share"].tolist()
    assert shown == pytest.approx(want)
    assert sae_run.is_done("features") and any({"kept", "shifted", "new", "lost"} <= set(df.columns) for df in frames)
    # shown with readable headers and fixed decimals; the data (and its CSV) keep the raw names
    shown_as = {}
    for d in at.dataframe:
        shown_as.update({col: c.get("label") for col, c in json.loads(d.proto.columns or "{}").items()})
    assert shown_as["fvu"] == "FVU" and shown_as["dead_fraction"] == "dead" and shown_as["kl_spliced"] == "KL spliced"
    # the SAEs below a quality bar are named under the table (the tiny run's are: see the assert)
    from core.report import sae_bar_misses

    misses = sae_bar_misses([json.loads((d / "metrics.json").read_text()) for _, _, d in sae_run.sae_dirs()])
    notes = [e.value for e in at.info if "quality bar" in e.value]
    assert misses and len(notes) == 1 and f"{len(misses)} of {len(sae_run.sae_dirs())} SAEs miss" in notes[0]
    assert all(m.line in notes[0] for m in misses), (misses, notes)
    # the advice follows the bars missed
    assert ("`quality` preset" in notes[0]) == any("fvu" in m.bars for m in misses)
    assert ("saes.training.lr" in notes[0]) == any("dead" in m.bars for m in misses)
    assert ("includes drift" in notes[0]) == any("spliced" in m.bars and m.model == "pretrained" for m in misses)
    assert shown_as["baseline_lost"] == "lost, seed twin"


def test_overview_advice_follows_the_bars_missed(app, sae_run, tmp_path):
    """A pre-trained SAE with a high FVU and a spliced-accuracy drop (edited into a copy of the tiny
    run): the box names it and gives the advice for both bars, drift included."""
    run = tmp_path / "run"
    shutil.copytree(sae_run.root, run)
    path = run / "saes" / "pretrained" / "layer_1" / "metrics.json"
    m = json.loads(path.read_text())
    m.update(fvu=0.31, accuracy_spliced=m["accuracy_original"] - 0.05)
    path.write_text(json.dumps(m))
    at = app(run=run).run()
    assert_clean(at)
    (note,) = [e.value for e in at.info if "quality bar" in e.value]
    assert "pretrained layer 1: FVU 0.310 > 0.20; spliced accuracy" in note and "5.0 points under" in note
    assert "`quality` preset" in note and "includes drift" in note


def test_overview_draws_sae_training_curves_and_matching_against_the_seed_twin(app, sae_run):
    """Both figures carry the run's own numbers: each SAE's logged training MSE and held-out FVU
    (metrics.json), and the matching shares beside the seed twin's (report)."""
    at = app().run()
    assert_clean(at)
    rep = build_report(sae_run)
    curves = chart_with_trace(at, "layer 1, held-out FVU")
    for model, axis in (("pretrained", "x"), ("finetuned", "x2")):
        for _, layer, d in (e for e in sorted(sae_run.sae_dirs()) if e[0] == model):
            m = json.loads((d / "metrics.json").read_text())
            (line,) = [t for t in curves["data"] if t["name"] == f"layer {layer}" and t.get("xaxis", "x") == axis]
            assert array(line["y"]).tolist() == pytest.approx(m["loss_curve"]["mse"])
            (mark,) = [t for t in curves["data"] if t["name"] == f"layer {layer}, held-out FVU" and t.get("xaxis", "x") == axis]
            assert array(mark["y"]).tolist() == pytest.approx([m["fvu"]])
    bars = chart_with_trace(at, "lost (no similar partner)")
    (lost,) = [t for t in bars["data"] if t["name"] == "lost (no similar partner)"]
    want = [v for r in sorted(rep["matching"], key=lambda r: r["layer"]) for v in (r["lost"], r["baseline_lost"])]
    assert array(lost["y"]).tolist() == pytest.approx(want)
    assert "seed twin" in texts(at)
    # a pre-trained-only figure is blank, not Streamlit's "None", on fine-tuned rows
    assert sae_table(at).proto.placeholder == "—"


def test_overview_says_which_step_brings_the_matching_when_it_has_not_run(app, sae_run, tmp_path):
    def drop_features(m: dict, root: Path) -> None:
        m["steps"].pop("features")
        shutil.rmtree(root / "features")

    run = _copy_run(sae_run.root, tmp_path / "no_features", drop_features)
    at = app(run=run).run()
    assert_clean(at)
    assert "Feature matching, pre-trained to fine-tuned" in [h.value for h in at.subheader]
    assert any("Feature matching needs the 'features' step" in i.value for i in at.info)
    assert any(c.value == f"python -m core build --run {run} --until features" for c in at.code)
    assert not any(t.get("name") == "lost (no similar partner)" for f in charts(at) for t in f["data"])
    sae_table(at)  # the SAE table is still there


def chart_with_trace(at: AppTest, name: str) -> dict:
    found = [f for f in charts(at) if any(t.get("name") == name for t in f["data"])]
    assert found, f"no chart with a trace named {name!r}"
    return found[0]


def sae_table(at: AppTest):
    (table,) = [d for d in at.dataframe if {"model", "layer", "fvu", "l0"} <= set(d.value.columns)]
    return table


def test_overview_sae_table_fits_until_every_column_is_asked_for(app, sae_run):
    """15+ columns scrolled sideways: by default the table shows the quality figures only, the
    toggle brings back the rest, and the data (and CSV) always hold every column."""
    at = app().run()
    table = sae_table(at)
    assert list(table.proto.column_order) == ["model", "layer", "architecture", "d_sae", "l0", "fvu", "dead_fraction", "accuracy_spliced", "kl_spliced", "fvu_on_finetuned"]
    # the models named as the charts name them; the CSV keeps the ids report --json uses
    assert set(table.value["model"]) == {"pre-trained", "fine-tuned"}
    (classes,) = [d.value for d in at.dataframe if {"class", "model", "f1"} <= set(d.value.columns)]
    assert set(classes["model"]) == {"pre-trained", "fine-tuned"}
    assert {"mse", "dense_fraction", "rare_error_share"} <= set(table.value.columns)
    at.toggle(key=keys.KEY_SAE_EVERY_COLUMN).set_value(True).run()
    assert_clean(at)
    assert list(sae_table(at).proto.column_order) == []  # no order given: every column, as in the data
    at.switch_page(SIMILARITY).run()
    at.switch_page("pages/overview.py").run()
    assert at.toggle(key=keys.KEY_SAE_EVERY_COLUMN).value and list(sae_table(at).proto.column_order) == []  # kept for the session


@pytest.mark.parametrize("page", ["pages/overview.py", SIMILARITY, EXPLORER, FEATURES])
def test_every_page_runs_without_exception(app, page):
    at = open_page(app(), page)
    assert_clean(at)
    assert at.get("plotly_chart") or at.info, "page shows neither charts nor an explanation"


def test_similarity_page_curves_heatmap_and_table(app):
    at = open_page(app(), SIMILARITY)
    assert_clean(at)
    curves, heatmap = charts(at)[:2]
    assert [t["name"] for t in curves["data"]] == ["cosine of means", "mean cosine", "token cosine", "linear CKA"]
    assert curves["data"][0]["x"] == [0, 1, 2]
    assert heatmap["data"][0]["type"] == "heatmap" and array(heatmap["data"][0]["z"]).shape == (3, 3)
    assert "pre-trained" in heatmap["layout"]["yaxis"]["title"]["text"]
    table = at.dataframe[0].value
    assert list(table.columns[:5]) == ["layer", "cosine_of_means", "mean_cosine", "token_cosine", "cka"]
    labels = [d.proto.label for d in at.get("download_button")]
    assert "Download CSV" in labels and "Download CKA matrix" in labels


def test_similarity_overlay_and_depth_normalisation(app, runs):
    at = open_page(app(), SIMILARITY)
    at.multiselect(key=keys.KEY_SIM_OVERLAY).select(str(runs["other"])).run()
    curves = charts(at)[0]  # with another run: one panel per measure, one line (colour) per run
    lines = {(t["name"], t["meta"]): t for t in curves["data"]}
    assert set(lines) == {(run, m) for run in ("tiny", "other") for m in ("cosine_of_means", "mean_cosine", "token_cosine", "cka")}
    assert lines["other", "cka"]["y"] == pytest.approx([v * 0.5 for v in lines["tiny", "cka"]["y"]])
    assert lines["tiny", "cka"]["y"] == pytest.approx([r["cka"] for r in read_json(runs["tiny"] / "similarity" / "similarity.json")["layers"]])
    assert lines["tiny", "cka"]["xaxis"] == lines["other", "cka"]["xaxis"] != lines["tiny", "mean_cosine"].get("xaxis", "x")  # same panel per measure
    assert lines["tiny", "cka"]["line"]["color"] != lines["other", "cka"]["line"]["color"]
    assert [t["name"] for t in curves["data"] if t.get("showlegend") is not False] == ["tiny", "other"]  # one legend entry per run
    (described,) = [d.value for d in at.dataframe if "run" in d.value.columns]  # what each line is
    assert described["run"].tolist() == ["tiny", "other"] and described["dataset"].tolist()[1] == "other.csv"
    tiny_ft = build_report(RunFolder(runs["tiny"]))["finetune"]
    assert described["accuracy, fine-tuned"].tolist()[0] == pytest.approx(tiny_ft["accuracy_finetuned"])
    assert described["classes"].tolist()[0] == len(tiny_ft["per_class"]["finetuned"])
    assert {"CKA between every pair of layers (tiny)", "Table (tiny)"} <= {s.value for s in at.subheader}  # the current run's, not the overlay's
    at.toggle(key=keys.KEY_SIM_NORMALISE).set_value(True).run()
    curves = charts(at)[0]
    assert curves["data"][0]["x"] == [0, 0.5, 1.0]
    assert any("relative depth" in str(v.get("title")) for k, v in curves["layout"].items() if k.startswith("xaxis"))
    at.get("button_group")[0].set_value(["cka"]).run()
    assert len(charts(at)[0]["data"]) == 2
    assert_clean(at)


def test_an_overlaid_run_of_the_same_name_gets_its_path_not_the_current_runs_place(app, runs, tmp_path):
    """The current run outside checkpoints/ is labelled by its folder name; an overlay with that
    label (checkpoints/other) is labelled by its path, and both runs keep their own lines."""
    at = open_page(app(run=_copy_run(runs["tiny"], tmp_path / "elsewhere" / "other")), SIMILARITY)
    at.multiselect(key=keys.KEY_SIM_OVERLAY).select(str(runs["other"])).run()
    lines = {(t["name"], t["meta"]): t["y"] for t in charts(at)[0]["data"]}
    overlay = shared.display_path(runs["other"])
    assert {name for name, _ in lines} == {"other", overlay}
    assert lines[overlay, "cka"] == pytest.approx([0.5 * y for y in lines["other", "cka"]])  # checkpoints/other is the halved copy
    (described,) = [d.value for d in at.dataframe if "run" in d.value.columns]
    assert described["run"].tolist() == ["other", overlay]
    assert_clean(at)


# ----------------------------------------------------------------------------- run selection
def test_sidebar_names_steps_built_by_an_earlier_version_of_their_method(app, sae_run, tmp_path, monkeypatch):
    """A run whose step this code would compute differently (``STEP_METHODS``): every page's
    sidebar names the step and the command that redoes it; an up-to-date run shows no note."""
    from core.runfolder import STEP_METHODS

    run = _copy_run(sae_run.root, tmp_path / "older")
    at = app(run=run).run()
    assert not [w for w in at.sidebar.warning if "earlier version" in w.value]
    monkeypatch.setitem(STEP_METHODS, "saes", 2)
    at = app(run=run).run()
    (note,) = [unescaped(w.value) for w in at.sidebar.warning if "earlier version" in w.value]
    assert note.startswith("Step saes was built by an earlier version of its method") and f"`python -m core build --run {run} --from saes`" in note
    assert_clean(at)


def test_sidebar_switches_run_and_remembers_it(app, runs):
    at = app().run()
    at.sidebar.selectbox(key=keys.KEY_RUN_SELECT).select(str(runs["other"])).run()
    assert at.session_state[keys.KEY_RUN] == str(runs["other"])
    assert "other.csv" in texts(at)
    at.switch_page(SIMILARITY).run()
    assert at.session_state[keys.KEY_RUN] == str(runs["other"])
    assert charts(at)[0]["data"][-1]["y"][0] == pytest.approx(0.5 * read_json(runs["tiny"] / "similarity" / "similarity.json")["layers"][0]["cka"])
    assert_clean(at)


def test_a_feature_picked_on_one_run_does_not_follow_to_another(app, runs, sae_run):
    """Feature numbers mean nothing across runs: each run keeps its own pick."""
    at = explorer(app)
    layer = int(at.selectbox(key=keys.KEY_EX_LAYER).value)
    key = keys.explorer_feature_key(RunFolder(runs["tiny"]), "pretrained", layer, "variance")
    top = at.number_input(key=key).value
    at.number_input(key=key).set_value(top + 1).run()
    at.sidebar.selectbox(key=keys.KEY_RUN_SELECT).select(str(runs["other"])).run()
    assert_clean(at)
    other_key = keys.explorer_feature_key(RunFolder(runs["other"]), "pretrained", layer, "variance")
    assert other_key != key and at.number_input(key=other_key).value == top  # the other run's own top feature
    assert f"feature {top} " in title(chart(at, SENTENCE))


def test_query_param_selects_run(app, runs):
    at = app(query=str(runs["other"])).run()
    assert at.session_state[keys.KEY_RUN] == str(runs["other"])
    at = app(query="other").run()  # a run name under checkpoints/ works too
    assert Path(at.session_state[keys.KEY_RUN]) == runs["other"].resolve()
    assert_clean(at)


def test_text_box_opens_any_run_folder_and_rejects_others(app, runs, tmp_path):
    at = app().run()
    at.sidebar.text_input(key=keys.KEY_RUN_TEXT).input(str(tmp_path)).run()
    assert at.session_state[keys.KEY_RUN] == str(runs["tiny"])
    assert "not a Layerscope run" in unescaped(at.sidebar.warning[0].value)
    at.sidebar.text_input(key=keys.KEY_RUN_TEXT).input(str(runs["evil"])).run()
    assert at.session_state[keys.KEY_RUN] == str(runs["evil"].resolve())
    assert_clean(at)
    too_long = str(tmp_path / ("r" * 300))  # the file system refuses even to look it up
    at.sidebar.text_input(key=keys.KEY_RUN_TEXT).input(too_long).run()
    assert at.session_state[keys.KEY_RUN] == str(runs["evil"].resolve())  # the run shown stays
    assert "cannot be opened (File name too long)" in unescaped(at.sidebar.warning[0].value)
    assert_clean(at)


def test_a_run_path_the_file_system_refuses_is_one_message(app, tmp_path):
    at = app(query=str(tmp_path / ("r" * 300))).run()
    assert not at.exception
    assert "cannot open the run folder" in at.error[0].value and "File name too long" in at.error[0].value
    assert not at.expander  # no bug-report details for a user mistake


def test_a_path_under_the_home_of_a_user_that_does_not_exist_is_one_message(app, runs):
    """``~user/...`` of no such user (Path.expanduser raises RuntimeError) in the URL, the
    LAYERSCOPE_CHECKPOINTS variable or the sidebar's run box: a message, never a traceback."""
    no_user = "~layerscope_no_such_user_xyz"
    for at in (app(query=f"{no_user}/run").run(), app(run=None, checkpoints=f"{no_user}/checkpoints").run()):
        assert not at.exception and not at.expander
        assert f"cannot expand '{no_user}'" in unescaped(at.error[0].value)
    at = app().run()
    at.sidebar.text_input(key=keys.KEY_RUN_TEXT).input(f"{no_user}/run").run()
    assert not at.exception and at.session_state[keys.KEY_RUN] == str(runs["tiny"])  # the run shown stays
    assert f"{no_user}/run" in unescaped(at.sidebar.warning[0].value)


MARKDOWN_PATH = "$HOME/*not italic*/[link](x)"  # LaTeX, emphasis and a link, were it markdown


def test_a_typed_path_in_a_message_is_shown_as_typed(app, runs, tmp_path):
    """Messages are markdown: what the user typed is escaped in them; their `code spans` stay."""
    at = app(query=str(tmp_path / MARKDOWN_PATH)).run()
    (box,) = at.error
    assert r"\$HOME/\*not italic\*/\[link\]\(x\)" in box.value  # every control character escaped
    assert f"`python -m core build --run '{tmp_path / MARKDOWN_PATH}'`" in box.value  # the command stays code, verbatim (quoted for the shell)
    at = app().run()
    at.sidebar.text_input(key=keys.KEY_RUN_TEXT).input(str(tmp_path / MARKDOWN_PATH)).run()
    assert r"\$HOME/\*not italic\*/\[link\]\(x\) is not a Layerscope run" in at.sidebar.warning[0].value
    at.sidebar.text_input(key=keys.KEY_RUN_TEXT).input("   ").run()  # the box emptied: its message goes too
    assert not at.sidebar.warning and at.sidebar.text_input(key=keys.KEY_RUN_TEXT).value == ""
    assert_clean(at)


def test_the_command_for_a_missing_step_quotes_a_path_with_spaces(app, sae_run, tmp_path):
    """The command builds every missing step up to the one the page needs (features needs saes,
    missing too here), and waits instead while a build runs in the folder."""
    import fcntl

    run = _copy_run(sae_run.root, tmp_path / "my runs" / "no saes", _drop_saes)
    at = app(run=run).run()
    at.switch_page(FEATURES).run()
    assert f"python -m core build --run '{run}' --until features" in [c.value for c in at.code]
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        at = app(run=run).run()
        at.switch_page(FEATURES).run()
        assert_clean(at)
        assert not at.code and any("a build running in this run has not finished yet" in i.value for i in at.info)
    finally:
        os.close(fd)


def test_missing_run_shows_a_message_not_a_traceback(app, tmp_path):
    at = app(run=tmp_path / "nope").run()
    assert not at.exception
    assert "does not exist" in at.error[0].value and "python -m core build" in at.error[0].value
    assert not at.expander  # no bug-report details for a user mistake


def test_unexpected_bug_shows_details_in_an_expander(app, monkeypatch):
    import core.report

    def broken(run, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(core.report, "build_report", broken)
    at = app().run()
    assert not at.exception
    assert "Something went wrong" in at.error[0].value
    assert "RuntimeError: boom" in at.expander[0].code[0].value


# ----------------------------------------------------------------------------- escaping
def test_html_in_run_metadata_is_escaped(app, runs):
    at = app(run=runs["evil"]).run()
    assert_clean(at)
    page = texts(at)
    assert "<script>" not in page and "&lt;script&gt;" in page
    for fig in charts(at):
        assert "<script>" not in json.dumps(fig, ensure_ascii=False)


# ----------------------------------------------------------------------------- empty state and build
def test_empty_state_explains_how_to_build(app, tmp_path):
    at = app(run=None, checkpoints=tmp_path / "empty").run()
    assert_clean(at)
    assert at.session_state[keys.KEY_RUN] is None
    target = tmp_path / "empty" / "default"  # LAYERSCOPE_CHECKPOINTS is honoured, in the text too
    assert f"python -m core build --run {target}" in [c.value for c in at.code]
    assert at.button[0].label == f"Build {target}"
    assert shared.display_path(shared.ROOT / "checkpoints" / "default") == "checkpoints/default"


def test_build_button_builds_in_the_background_and_opens_the_run(app, monkeypatch, tmp_path, tiny_model, tiny_csv):
    overrides = {**tiny_overrides(tiny_model, tiny_csv), "finetune.epochs": 1}
    args = ["--preset", "tiny", "--until", "similarity"] + [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    monkeypatch.setenv("LAYERSCOPE_BUILD_ARGS", shlex.join(args))
    ckpt = tmp_path / "ckpt"
    at = app(run=None, checkpoints=ckpt).run()
    at.button[0].click().run()
    seen_progress = False
    deadline = time.monotonic() + 240
    while at.session_state[keys.KEY_RUN] is None and time.monotonic() < deadline:
        seen_progress |= bool(at.get("progress"))
        assert not at.exception
        time.sleep(1)
        at.run()
    assert at.session_state[keys.KEY_RUN] == str(ckpt / "default"), (ckpt / "build-default.log").read_text()
    assert seen_progress
    assert (ckpt / "build-default.log").is_file()
    assert RunFolder(ckpt / "default").is_done("similarity")
    at.run()
    assert_clean(at)
    assert len(charts(at)) >= 5


def test_the_start_page_waits_for_a_build_another_process_is_running(app, tmp_path):
    """A build started elsewhere holds the default run's folder (the writer's lock): the start page
    says so instead of offering a second build, and the other build's log is left alone."""
    import fcntl

    ckpt = tmp_path / "ckpt"
    target = ckpt / "default"
    target.mkdir(parents=True)
    background.build_log_path(target).write_text("[data] running in checkpoints/default ...\n")
    fd = os.open(target, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        at = app(run=None, checkpoints=ckpt).run()
        assert not at.exception and not at.button
        assert "is being built by another process" in at.info[0].value
        background.start_build(target)  # a click that raced the lock: nothing is started or truncated
        assert background.build_state(target) is None
        assert background.build_log_path(target).read_text() == "[data] running in checkpoints/default ...\n"
    finally:
        os.close(fd)
    at = app(run=None, checkpoints=ckpt).run()
    assert [b.label for b in at.button] == [f"Build {target}"]  # free again: the button is back


def test_the_sidebar_says_when_a_build_is_running_in_the_run_shown(app, tiny_run, tmp_path):
    import fcntl

    run = tmp_path / "run"
    shutil.copytree(tiny_run.root, run)
    assert "build is running" not in app(run=run).run().sidebar.caption[-1].value
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        at = app(run=run).run()
        assert "A build is running in this run now" in at.sidebar.caption[-1].value and not at.exception
    finally:
        os.close(fd)


def test_parse_build_log_reads_steps_and_tqdm_percent():
    log = "[data] running in r ...\n[data] finished in 0.1 s (peak memory 412 MB)\n[finetune] running in r ...\n 10%|#  | 1/10\r 40%|####  | 4/10\r"
    state = background.parse_build_log(log)
    assert state["done"] == ["data"] and state["current"] == "finetune" and state["percent"] == 40
    assert state["fraction"] == pytest.approx((1 + 0.4) / 6)
    state = background.parse_build_log(log + "\n[finetune] finished in 3 s\n[activations] already done in r\nerror: disk full\n")
    assert state["done"] == ["data", "finetune", "activations"] and state["current"] is None
    assert state["error"] == "disk full" and state["fraction"] == pytest.approx(3 / 6)


def test_the_progress_parser_reads_what_the_pipeline_prints(sae_run, tmp_path):
    """The dashboard's build progress reads the pipeline's own log lines, not copies of them."""
    from core.pipeline import resolve_run_config, run_step

    run = RunFolder(_copy_run(sae_run.root, tmp_path / "logged"))
    cfg = resolve_run_config(run, None, None, {})
    lines: list[str] = []
    run_step(run, "similarity", cfg, log=lines.append)  # done: skipped
    assert background.parse_build_log("\n".join(lines))["done"] == ["similarity"]
    run_step(run, "similarity", cfg, redo=True, log=lines.append)
    assert background.parse_build_log("\n".join(lines[:2]))["current"] == "similarity"  # running
    assert background.parse_build_log("\n".join(lines[1:]))["done"] == ["similarity"] and len(lines) == 3  # finished


# ----------------------------------------------------------------------------- sentence explorer
def explorer(app, **kw) -> AppTest:
    at = open_page(app(**kw), EXPLORER)
    assert_clean(at)
    return at


def test_explorer_shows_cosine_prediction_feature_and_top_features(app, sae_run):
    at = explorer(app)
    (fig,) = charts(at)  # one chart for the sentence: the browser redraws one chart per Enter, not two
    assert SENTENCE in title(fig)
    assert [t["name"] for t in fig["data"]] == ["cosine", "feature", "difference", "top features"]  # top to bottom
    cosine = trace(fig, "cosine")
    assert array(cosine["z"]).shape[0] == sae_run_num_layers(sae_run) + 1
    assert "[CLS]" in xlabels(fig) and "brilliant" in xlabels(fig)
    assert "customdata[0]" in cosine["hovertemplate"] and "cosine %{z" in cosine["hovertemplate"]
    assert cosine["zmax"] == 1 and cosine["colorbar"]["title"]["text"] == "cosine"
    # the page shows what core computes for the sentence, on the same token columns as the SAE panels
    from core.analysis import layer_cosine, load_bundle, sentence_state

    bundle = load_bundle(sae_run)
    state = sentence_state(bundle, at.text_input(key=keys.KEY_TEXT).value)
    np.testing.assert_allclose(array(cosine["z"]), np.array(layer_cosine(state), dtype=float), atol=1e-6)
    assert all(t["x"] == list(range(len(state.tokens))) for t in fig["data"])
    assert trace(fig, "difference")["zmid"] == 0  # the difference is diverging, centred at zero
    assert "top 8 features of this SAE by variance" in subtitle(fig)  # sharing the chart, below
    top = trace(fig, "top features")
    assert top["xaxis"] == "x" and len(fig["layout"]["yaxis"]["ticktext"]) == 8
    assert all(fig["layout"][f"xaxis{i}"]["matches"] == "x" for i in (2, 3, 4))  # one token axis for every panel
    bars = at.get("progress")  # one bar per class, in label order
    assert [b.text.rsplit(":", 1)[0] for b in bars] == read_json(sae_run.labels_path)["names"]
    assert 100 - len(bars) <= sum(b.value for b in bars) <= 100 + len(bars)  # probabilities, in percent
    assert [float(b.text.rsplit(": ", 1)[1]) for b in bars] == pytest.approx([b.value / 100 for b in bars], abs=0.006)
    shown = max(bars, key=lambda b: b.value).text.rsplit(":", 1)[0]
    assert f"**Prediction: {shown}**" in [m.value for m in at.markdown]
    (picker,) = [n for n in at.number_input if n.label == "Feature"]
    d_sae = json.loads(next((sae_run.root / "saes").rglob("cfg.json")).read_text())["d_sae"]
    assert picker.min == 0 and picker.max == d_sae - 1  # no feature beyond the dictionary can be asked for


def test_a_silent_feature_under_a_sentence_ranking_points_to_the_rows_below(app, sae_run):
    """Ranked on the sentence, the top rows are the sentence's own: the hint for a silent feature
    says to pick one of them, not to rank by sentence variance (already the ranking)."""
    from core.analysis import latents, load_bundle, sentence_state

    at = explorer(app)
    at.selectbox(key=keys.KEY_EX_RANK).set_value("sentence").run()
    layer = int(at.selectbox(key=keys.KEY_EX_LAYER).value)
    bundle = load_bundle(sae_run)
    state = sentence_state(bundle, at.text_input(key=keys.KEY_TEXT).value)
    fired = sum(latents(bundle, state, "pretrained", layer, on).abs().sum(0) for on in ("pretrained", "finetuned"))  # [d_sae]
    quiet = int((fired == 0).nonzero()[0, 0])  # a feature silent on this sentence in both models
    at.number_input[0].set_value(quiet).run()
    assert_clean(at)
    (hint,) = [i.value for i in at.info if "does not fire" in i.value]
    assert hint.startswith(f"Feature {quiet} does not fire on this sentence") and "pick one of the top features below, ranked on this sentence" in hint
    assert "rank by sentence variance" not in hint


def test_the_explorer_starts_at_a_feature_that_fires_and_marks_silent_rows(app, sae_run):
    """The dataset's top-variance features are often silent on one sentence: the picker starts at
    the first ranked one that fires, and the top rows that do not fire say so."""
    from core.analysis import analyze_text, load_bundle

    bundle = load_bundle(sae_run)
    layer = max(bundle.sae_layers)
    first_silent = 0
    for text in ("the acting was brilliant but the plot was dull", "a dull film", "brilliant", "the plot"):
        at = app()
        at.session_state[keys.KEY_TEXT] = text  # the first sentence the page shows
        at = open_page(at, EXPLORER)
        assert_clean(at)
        assert at.text_input(key=keys.KEY_TEXT).value == text
        rows = next(e for e in analyze_text(bundle, text, top=8, rank_by="variance", saes=[("pretrained", layer)])["saes"])["features"]
        fires = [any(r["activations"]) for r in rows]
        (picker,) = [n for n in at.number_input if n.label == "Feature"]
        assert picker.value == int(next((r for r, f in zip(rows, fires) if f), rows[0])["feature"])
        labels = chart(at, SENTENCE)["layout"]["yaxis"]["ticktext"]
        assert labels == [f"feature {r['feature']}" + ("" if f else " · silent") for r, f in zip(rows, fires)]
        first_silent += not fires[0] and any(fires)
        said = [i.value for i in at.info if f"Feature {picker.value} does not fire on this sentence" in i.value]
        assert bool(said) == (not any(fires))
        if said:  # every top row silent too: the way out is a ranking on this sentence
            assert "nor do the top 8 features by variance" in said[0] and "rank by sentence variance" in said[0]
    assert first_silent, "some sentence's top-variance feature is silent while another fires: the case this is about"
    # not picked by hand: the picker follows each new sentence to its own first firing feature
    def default_of(text):
        rows = next(iter(analyze_text(bundle, text, top=8, rank_by="variance", saes=[("pretrained", layer)])["saes"]))["features"]
        return int(next((r for r in rows if any(r["activations"])), rows[0])["feature"]), rows

    texts = ("the acting was brilliant but the plot was dull", "a dull film", "brilliant", "the plot", "terrible", "was", "it was great fun")
    defaults = {t: default_of(t)[0] for t in texts}
    assert len(set(defaults.values())) > 1, defaults  # sentences that start at different features
    for text in sorted(texts, key=lambda t: defaults[t] == picker.value):  # one that moves the picker first
        at.text_input(key=keys.KEY_TEXT).input(text).run()
        assert [n for n in at.number_input if n.label == "Feature"][0].value == defaults[text], text
    expected, rows = default_of(text)
    picked = next(int(r["feature"]) for r in rows if int(r["feature"]) != expected)
    [n for n in at.number_input if n.label == "Feature"][0].set_value(picked).run()
    at.text_input(key=keys.KEY_TEXT).input("the acting was brilliant but the plot was dull").run()
    assert [n for n in at.number_input if n.label == "Feature"][0].value == picked  # picked by hand: it stays for the next sentence


def test_the_explorer_shows_what_the_models_read(app, sae_run):
    at = explorer(app)
    at.text_input(key=keys.KEY_TEXT).input("The acting was <b>BRILLIANT</b>!").run()
    assert_clean(at)
    assert not at.warning
    assert "The models read it as the run's training texts were cleaned: “the acting was brilliant”" in [unescaped(c.value) for c in at.caption]
    at.text_input(key=keys.KEY_TEXT).input("😍😍😍 🎬").run()
    assert_clean(at)
    said = [unescaped(w.value) for w in at.warning]
    assert len(said) == 2 and "leaves nothing of this text" in said[0] and "tokens are unknown to the model's vocabulary" in said[1]
    assert not any("The models read it" in c.value for c in at.caption)  # read as typed: the warning says so
    (pred,) = [m.value for m in at.markdown if m.value.startswith("**Prediction:")]
    assert "from unknown tokens only" in pred  # the classifier read no word of it
    at.text_input(key=keys.KEY_TEXT).input("a great film 😍").run()
    (pred,) = [m.value for m in at.markdown if m.value.startswith("**Prediction:")]
    assert "unknown tokens" not in pred  # some words read: a reading of the text


def test_saes_removed_after_their_step_point_to_the_step_that_trains_them_again(app, sae_run, tmp_path):
    """`saes` gone by hand while the manifest says the step ran: `build --until saes` would only say
    "already done", so both pages name `saes --force`."""
    run = _copy_run(sae_run.root, tmp_path / "saes_gone")
    shutil.rmtree(run / "saes")
    at = explorer(app, run=run)
    assert any("no SAEs" in i.value and f"saes --run {run}" in unescaped(i.value) and "--force" in i.value for i in at.info), [i.value for i in at.info]
    at.switch_page(FEATURES).run()
    assert any(f"python -m core saes --run {run} --force" in c.value for c in at.code)


def _drop_saes(m: dict, root: Path) -> None:
    shutil.rmtree(root / "saes")
    for step in ("saes", "features"):
        m["steps"].pop(step, None)


def test_explorer_without_saes_shows_the_cosine_map_beside_the_prediction(app, sae_run, tmp_path):
    at = explorer(app, run=_copy_run(sae_run.root, tmp_path / "no_saes", _drop_saes))
    assert any("no SAEs" in i.value and "build --run" in i.value and "--until saes" in i.value for i in at.info)
    (fig,) = charts(at)
    assert title(fig).startswith("Cosine, pre-trained vs fine-tuned") and len(fig["data"]) == 1
    assert array(fig["data"][0]["z"]).shape[0] == sae_run_num_layers(sae_run) + 1
    assert [b.text.rsplit(":", 1)[0] for b in at.get("progress")] == read_json(sae_run.labels_path)["names"]



def test_explorer_offers_only_the_dictionaries_trained_at_the_layer(app, sae_run, tmp_path):
    """A layer with one model's SAE only (a saes step still running, a folder removed): the other
    dictionary is not offered, the help says why, and a choice kept from another layer falls back."""
    run = _copy_run(sae_run.root, tmp_path / "one_missing")
    layers = sorted({layer for _, layer, _ in sae_run.sae_dirs()})
    shutil.rmtree(run / "saes" / "finetuned" / f"layer_{layers[-1]}")
    at = explorer(app, run=run)
    at.selectbox(key=keys.KEY_EX_LAYER).set_value(layers[0]).run()
    at.segmented_control(key=keys.KEY_EX_MODEL).set_value("finetuned").run()
    assert at.segmented_control(key=keys.KEY_EX_MODEL).options == ["pre-trained", "fine-tuned"]
    at.selectbox(key=keys.KEY_EX_LAYER).set_value(layers[-1]).run()
    assert_clean(at)
    control = at.segmented_control(key=keys.KEY_EX_MODEL)
    assert control.options == ["pre-trained"] and control.value == "pretrained"
    assert control.help == f"this run has no fine-tuned SAE at layer {layers[-1]}"
    (fig,) = charts(at)
    assert f"pre-trained SAE, layer {layers[-1]}" in title(fig)  # the feature panel is drawn, not an error



def test_a_damaged_sae_costs_the_explorer_that_sae_only(app, sae_run, tmp_path):
    """A truncated weights file and class names that do not fit the model: one warning naming each
    file, and the explorer goes on with the other SAEs and the model's own class names."""
    run = _copy_run(sae_run.root, tmp_path / "damaged_sae")
    layers = sorted({layer for _, layer, _ in sae_run.sae_dirs()})
    weights = run / "saes" / "finetuned" / f"layer_{layers[-1]}" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    labels = read_json(sae_run.labels_path)["names"]
    (run / "data" / "labels.json").write_text('{"names": ["one", "two", "three"]}')
    at = explorer(app, run=run)
    (box,) = at.warning  # the statistics, checked against the class names, are not blamed for them
    message = unescaped(box.value)
    assert f"fine-tuned SAE, layer {layers[-1]}: {weights} is truncated" in message
    assert "class names:" in message and "names 3 classes but the fine-tuned model has 2" in message
    control = at.segmented_control(key=keys.KEY_EX_MODEL)
    assert control.options == ["pre-trained"] and at.selectbox(key=keys.KEY_EX_LAYER).value == layers[-1]
    assert control.help == f"the fine-tuned SAE at layer {layers[-1]} could not be read (see the warning above)"
    (fig,) = charts(at)
    assert [t["name"] for t in fig["data"]] == ["cosine", "feature", "difference", "top features"]
    assert [b.text.rsplit(":", 1)[0] for b in at.get("progress")] == labels
    at.selectbox(key=keys.KEY_EX_LAYER).set_value(layers[0]).run()
    assert_clean(at)
    assert at.segmented_control(key=keys.KEY_EX_MODEL).options == ["pre-trained", "fine-tuned"]


def test_a_damaged_matching_file_costs_the_feature_browser_its_match_only(app, features_run, tmp_path):
    run = _copy_run(features_run.root, tmp_path / "damaged_match")
    layer = max(layer for _, layer, _ in features_run.sae_dirs())  # the layer the browser opens
    path = run / "features" / "matching" / f"layer_{layer}.json"
    assert path.is_file()
    path.write_text("{")
    at = open_page(app(run=run), FEATURES)
    assert not at.exception and not at.error
    (box,) = at.warning  # once, above the table; the card's match box points to it
    assert unescaped(box.value).startswith(f"The table has no match columns: {path} is not valid JSON")
    assert any(c.value.startswith("No match shown: this layer's matching file cannot be read") for c in at.caption)
    (table,) = [d.value for d in at.dataframe if "variance" in d.value.columns]
    assert len(table) > 0 and "status" not in table.columns
    assert at.subheader and at.subheader[0].value.startswith("Feature ")  # the card is drawn
    assert any("Top activating examples" in m.value for m in at.markdown)


def test_explorer_on_a_damaged_statistics_file_says_so_and_ranks_by_the_sentence(app, sae_run, tmp_path):
    run = _copy_run(sae_run.root, tmp_path / "damaged_stats")
    layer = max(layer for _, layer, _ in sae_run.sae_dirs())  # what the explorer shows first: the last layer's pre-trained SAE
    stats = run / "features" / "pretrained" / f"layer_{layer}" / "stats.safetensors"
    at = explorer(app, run=run)
    assert not at.warning  # analysed with good statistics first: the damage must not hide behind the cache
    stats.write_bytes(stats.read_bytes()[:100])
    at.run()
    assert (at.segmented_control(key=keys.KEY_EX_MODEL).value, at.selectbox(key=keys.KEY_EX_LAYER).value) == ("pretrained", layer)
    (box,) = at.warning
    assert f"{stats} is truncated" in unescaped(box.value) and "ranked by their variance over this sentence" in unescaped(box.value)
    (fig,) = charts(at)  # the cosine map, the feature and its top features are all drawn
    assert [t["name"] for t in fig["data"]] == ["cosine", "feature", "difference", "top features"]
    assert "features of this SAE by variance over this sentence" in unescaped(json.dumps(fig["layout"]["title"]))


def test_a_failing_sae_panel_leaves_the_cosine_map_and_the_prediction(app, sae_run, monkeypatch):
    from core.errors import LayerscopeError

    def broken(*args, **kwargs):
        raise LayerscopeError("feature store unreadable")

    monkeypatch.setattr(cached, "sentence_features", broken)
    at = open_page(app(), EXPLORER)
    assert any("feature store unreadable" in e.value for e in at.error) and not at.exception
    (fig,) = charts(at)
    assert title(fig).startswith("Cosine, pre-trained vs fine-tuned") and "brilliant" in xlabels(fig)
    assert len(at.get("progress")) == len(read_json(sae_run.labels_path)["names"])


def sae_run_num_layers(run: RunFolder) -> int:
    return read_json(run.similarity_dir / "similarity.json")["layers"][-1]["layer"]


def test_typing_a_sentence_changes_the_heatmaps(app, sae_run):
    at = explorer(app)
    before = chart(at, SENTENCE)
    at.text_input(key=keys.KEY_TEXT).input("the music was awful and boring").run()
    assert_clean(at)
    after = chart(at, SENTENCE)
    for name in ("cosine", "feature", "difference", "top features"):
        a, b = array(trace(before, name)["z"]), array(trace(after, name)["z"])
        assert a.shape != b.shape or not np.allclose(a, b, equal_nan=True), name
    assert "awful" in xlabels(after)


def test_script_tags_typed_as_a_sentence_stay_text(app, sae_run, runs):
    for run in (runs["tiny"], runs["evil"]):  # with and without the run's text cleaning
        at = explorer(app, run=run)
        at.text_input(key=keys.KEY_TEXT).input(EVIL_TEXT).run()
        assert_clean(at)
        specs = json.dumps(charts(at), ensure_ascii=False)
        assert "<script>" not in specs and "<b>" not in specs and "</b>" not in specs
        assert "<script>" not in texts(at)
        assert "alert" in xlabels(chart(at, SENTENCE))
    assert "&lt;" in xlabels(chart(at, SENTENCE))  # the uncleaned run keeps '<' as a token


def test_layer_and_feature_pickers(app, sae_run, runs):
    from core.analysis import analyze_text, load_bundle

    at = explorer(app)
    layers = at.selectbox(key=keys.KEY_EX_LAYER).options
    assert len(layers) >= 1
    first = layers[0]
    at.selectbox(key=keys.KEY_EX_LAYER).select(int(first)).run()
    assert f"layer {first}" in title(chart(at, SENTENCE))
    key = keys.explorer_feature_key(RunFolder(runs["tiny"]), "pretrained", int(first), "variance")
    top = at.number_input(key=key).value
    assert f"feature {top} " in title(chart(at, SENTENCE))
    at.number_input(key=key).set_value(top + 1).run()
    assert f"feature {top + 1} " in title(chart(at, SENTENCE))
    at.segmented_control(key=keys.KEY_EX_MODEL).set_value("finetuned").run()
    assert "fine-tuned SAE" in title(chart(at, SENTENCE))
    at.segmented_control(key=keys.KEY_EX_MODEL).set_value("pretrained").run()
    at.selectbox(key=keys.KEY_EX_RANK).select("density").run()
    assert "by density" in chart(at, SENTENCE)["layout"]["title"]["subtitle"]["text"]
    # a new ranking starts at its own top feature (core's ranking), and the pick made under
    # variance waits there for the way back
    (entry,) = analyze_text(load_bundle(sae_run), at.text_input(key=keys.KEY_TEXT).value, top=3, rank_by="density", saes=[("pretrained", int(first))])["saes"]
    by_density = keys.explorer_feature_key(RunFolder(runs["tiny"]), "pretrained", int(first), "density")
    assert at.number_input(key=by_density).value == entry["features"][0]["feature"]
    assert f"feature {entry['features'][0]['feature']} " in title(chart(at, SENTENCE))
    at.selectbox(key=keys.KEY_EX_RANK).select("variance").run()
    assert at.number_input(key=key).value == top + 1 and f"feature {top + 1} " in title(chart(at, SENTENCE))
    assert_clean(at)


def test_explorer_ranks_top_features_by_this_sentence(app, sae_run):
    """The per-sentence rankings (variance over the sentence's tokens; change by fine-tuning on
    it): the top-features panel lists core's ranking; two compared sentences are ranked on their
    tokens together, so both charts list the same features (each sentence alone lists others)."""
    from core.analysis import analyze_text, load_bundle, sentence_state

    at = explorer(app)
    assert at.selectbox(key=keys.KEY_EX_RANK).options == ["variance", "selectivity", "density", "change", "sentence variance", "sentence change"]
    at.selectbox(key=keys.KEY_EX_RANK).set_value("sentence").run()
    assert_clean(at)
    bundle = load_bundle(sae_run)
    layer, top = int(at.selectbox(key=keys.KEY_EX_LAYER).value), int(at.slider(key=keys.KEY_EX_TOP).value)
    (fig,) = [f for f in charts(at) if SENTENCE in title(f)]
    at.toggle(key=keys.KEY_COMPARE).set_value(True).run()
    at.text_input(key=keys.KEY_TEXT_B).set_value("a dull boring film").run()
    texts_shown = [at.text_input(key=k).value for k in (keys.KEY_TEXT, keys.KEY_TEXT_B)]
    alone = {}
    for rank_by in ("sentence", "sentence-change"):
        for text in texts_shown:
            (entry,) = analyze_text(bundle, text, top=top, rank_by=rank_by, saes=[("pretrained", layer)])["saes"]
            alone[rank_by, text] = [f"#{f['feature']}" for f in entry["features"]]
    assert f"top {top} features of this SAE by variance over this sentence" in subtitle(fig)
    assert fig["layout"]["yaxis"]["ticktext"] == [label.replace("#", "feature ") for label in alone["sentence", texts_shown[0]]]
    states = [sentence_state(bundle, t) for t in texts_shown]
    for rank_by, words in (("sentence", f"top {top} features of this SAE by variance over the compared sentences"), ("sentence-change", f"the {top} features fine-tuning changed most on the compared sentences (fine-tuned − pre-trained)")):
        at.selectbox(key=keys.KEY_EX_RANK).set_value(rank_by).run()
        assert_clean(at)
        figs = [f for f in charts(at) if SENTENCE in title(f)]
        assert len(figs) == 2
        for fig, text, state in zip(figs, texts_shown, states):
            assert words in subtitle(fig)
            (entry,) = analyze_text(bundle, text, top=top, rank_by=rank_by, saes=[("pretrained", layer)], state=state, compared=states)["saes"]
            marks = [" · silent" * (not any(f["activations"]) and not any(f.get("difference") or [])) for f in entry["features"]]  # top over both: silent on one of them
            assert fig["layout"]["yaxis"]["ticktext"] == [f"#{f['feature']}{m}" for f, m in zip(entry["features"], marks)]  # side by side: short row labels
            if rank_by == "sentence-change":
                panel = trace(fig, "top features")  # what the ranking measured: the difference, diverging around 0
                np.testing.assert_allclose(array(panel["z"]), np.array([f["difference"] for f in entry["features"]]), atol=1e-6)
                assert panel["zmid"] == 0 and panel["zmin"] == -panel["zmax"]
        assert [t.removesuffix(" · silent") for t in figs[0]["layout"]["yaxis"]["ticktext"]] == [t.removesuffix(" · silent") for t in figs[1]["layout"]["yaxis"]["ticktext"]]
    assert any(alone[r, texts_shown[0]] != alone[r, texts_shown[1]] for r in ("sentence", "sentence-change"))  # alone they differ: the pair is what makes one list


def test_with_a_sentence_ranking_each_sentence_starts_at_its_own_top_feature(app, sae_run):
    """Ranked over the sentence, the top feature is the sentence's: a new sentence starts the
    picker there (it kept the first sentence's top feature, which may be silent on the new one);
    a feature picked for a sentence is still picked when that sentence comes back."""
    from core.analysis import analyze_text, load_bundle

    at = explorer(app)
    at.selectbox(key=keys.KEY_EX_RANK).set_value("sentence").run()
    layer = int(at.selectbox(key=keys.KEY_EX_LAYER).value)
    bundle = load_bundle(sae_run)

    def top_of(text: str) -> int:
        (entry,) = analyze_text(bundle, text, top=3, rank_by="sentence", saes=[("pretrained", layer)])["saes"]
        return entry["features"][0]["feature"]

    candidates = ["a dull film", "brilliant acting and a great plot", "the worst movie i have seen", "i loved every minute"]
    first = candidates[0]
    second = next(t for t in candidates[1:] if top_of(t) != top_of(first))  # two sentences with different top features
    for text in (first, second):
        at.text_input(key=keys.KEY_TEXT).input(text).run()
        (picker,) = at.number_input
        assert picker.value == top_of(text) and f"feature {top_of(text)} " in title(chart(at, SENTENCE)), text
    at.text_input(key=keys.KEY_TEXT).input(first).run()
    at.number_input[0].set_value(top_of(first) + 1).run()
    at.text_input(key=keys.KEY_TEXT).input(second).run()
    assert at.number_input[0].value == top_of(second)
    at.text_input(key=keys.KEY_TEXT).input(first).run()
    assert at.number_input[0].value == top_of(first) + 1  # the pick made for this sentence
    assert_clean(at)


def test_explorer_choices_survive_an_empty_sentence_and_a_page_switch(app, sae_run):
    """They were reset to their defaults: the page returned before drawing them, and Streamlit
    drops the state of a widget that is not drawn."""
    at = explorer(app)
    first = int(at.selectbox(key=keys.KEY_EX_LAYER).options[0])
    at.selectbox(key=keys.KEY_EX_LAYER).select(first).run()
    at.selectbox(key=keys.KEY_EX_RANK).select("density").run()
    at.slider(key=keys.KEY_EX_TOP).set_value(5).run()
    at.segmented_control(key=keys.KEY_EX_MODEL).set_value("finetuned").run()

    def assert_kept(at: AppTest) -> None:
        assert_clean(at)
        feature = chart(at, SENTENCE)
        assert f"fine-tuned SAE, layer {first})" in title(feature)
        assert "top 5 features of this SAE by density" in subtitle(feature)

    at.text_input(key=keys.KEY_TEXT).input(" ").run()
    assert [i.value for i in at.info] == ["Type a sentence and press Enter."] and not charts(at)
    at.text_input(key=keys.KEY_TEXT).input("the plot was dull").run()
    assert_kept(at)
    at.switch_page(SIMILARITY).run()
    assert_clean(at)
    at.switch_page(EXPLORER).run()
    assert_kept(at)
    assert "dull" in xlabels(chart(at, SENTENCE))


def test_the_explorer_url_is_a_link_to_the_view(app, sae_run, runs):
    """The address bar holds the sentence, layer, dictionary and feature shown; opening that link
    in a new session shows the same view; values that do not fit the run fall back, no error."""
    layers = sorted({layer for _, layer, _ in sae_run.sae_dirs()})
    at = explorer(app)
    at.text_input(key=keys.KEY_TEXT).input("the music was awful").run()
    at.selectbox(key=keys.KEY_EX_LAYER).set_value(layers[0]).run()
    at.segmented_control(key=keys.KEY_EX_MODEL).set_value("finetuned").run()
    at.number_input(key=keys.explorer_feature_key(RunFolder(runs["tiny"]), "finetuned", layers[0], "variance")).set_value(3).run()
    at.slider(key=keys.KEY_EX_TOP).set_value(5).run()
    at.toggle(key=keys.KEY_EX_MATCHED).set_value(True).run()
    assert_clean(at)
    link = {k: at.query_params[k] for k in ("text", "layer", "sae", "feature", "rank", "top", "match")}
    assert [v[0] if isinstance(v, list) else v for v in link.values()] == ["the music was awful", str(layers[0]), "finetuned", "3", "variance", "5", "1"]
    assert "text_b" not in at.query_params
    fresh = app()
    for k, v in link.items():
        fresh.query_params[k] = v
    fresh = open_page(fresh, EXPLORER)
    assert_clean(fresh)
    assert fresh.text_input(key=keys.KEY_TEXT).value == "the music was awful"
    assert (fresh.selectbox(key=keys.KEY_EX_LAYER).value, fresh.segmented_control(key=keys.KEY_EX_MODEL).value) == (layers[0], "finetuned")
    assert f"feature 3 (fine-tuned SAE, layer {layers[0]})" in title(chart(fresh, SENTENCE))
    assert fresh.slider(key=keys.KEY_EX_TOP).value == 5 and fresh.toggle(key=keys.KEY_EX_MATCHED).value and chart(fresh, "its match")
    ranked = app()
    ranked.query_params.update(text="the music was awful", rank="density", top="50")  # 50: beyond the slider, left at its default
    ranked = open_page(ranked, EXPLORER)
    assert_clean(ranked)
    assert ranked.selectbox(key=keys.KEY_EX_RANK).value == "density" and ranked.slider(key=keys.KEY_EX_TOP).value == 8
    fresh.text_input(key=keys.KEY_TEXT).input("the plot was dull").run()  # the viewer's own changes win over the link
    assert fresh.text_input(key=keys.KEY_TEXT).value == "the plot was dull" and "plot" in xlabels(chart(fresh, SENTENCE))
    # a compared pair, and values this run does not have
    odd = app()
    for k, v in {"text": "the acting was great", "text_b": "the acting was poor", "layer": "99", "sae": "nonsense", "feature": "100000", "stack": "1"}.items():
        odd.query_params[k] = v
    odd = open_page(odd, EXPLORER)
    assert_clean(odd)
    assert odd.toggle(key=keys.KEY_COMPARE).value and odd.text_input(key=keys.KEY_TEXT_B).value == "the acting was poor"
    assert odd.toggle(key=keys.KEY_EX_STACK).value and [h.value for h in odd.subheader][:2] == ["the acting was great", "the acting was poor"]
    assert odd.selectbox(key=keys.KEY_EX_LAYER).value == layers[-1] and len([f for f in charts(odd) if SENTENCE in title(f)]) == 2
    # digits int() does not read (a superscript), and a link that names no dictionary or sentence:
    # the pre-trained one, the sentence shown, the rest of the link applied
    for params, want in (({"text": "a fine film", "layer": "\u00b3", "feature": "\u00b2"}, (layers[-1], "pretrained", None)), ({"layer": str(layers[0]), "feature": "4"}, (layers[0], "pretrained", 4)), ({"text": "", "layer": str(layers[0]), "sae": "Fine-tuned", "feature": "2"}, (layers[0], "finetuned", 2))):
        at = app()
        for k, v in params.items():
            at.query_params[k] = v
        at = open_page(at, EXPLORER)
        assert_clean(at)
        assert (at.selectbox(key=keys.KEY_EX_LAYER).value, at.segmented_control(key=keys.KEY_EX_MODEL).value) == want[:2], params
        assert at.text_input(key=keys.KEY_TEXT).value == (params.get("text") or "the acting was brilliant but the plot was dull")
        if want[2] is not None:
            assert f"feature {want[2]} (" in title(chart(at, SENTENCE)), params
    # a repeated parameter is written back once
    at = app()
    at.query_params["text"] = ["one", "two"]
    at = open_page(at, EXPLORER)
    assert at.query_params["text"] in ("two", ["two"]) and at.text_input(key=keys.KEY_TEXT).value == "two"


def test_a_link_with_sentences_sets_the_boxes_without_streamlits_default_value_warning(app, sae_run, monkeypatch, caplog):
    """A link's sentences reach the boxes through the session state; boxes also given a default
    made Streamlit log its warning, with a stack, on every visit by link (see the feature
    browser's test of the same warning)."""
    from streamlit.elements.lib import policies

    monkeypatch.setattr(policies.runtime, "exists", lambda: True)
    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    at = app()
    at.query_params["text"], at.query_params["text_b"] = "a fine film", "a dull film"
    at = open_page(at, EXPLORER)
    assert_clean(at)
    assert [at.text_input(key=k).value for k in (keys.KEY_TEXT, keys.KEY_TEXT_B)] == ["a fine film", "a dull film"]
    assert "Session State API" not in caplog.text
    fresh = explorer(app)  # no link: the defaults
    assert fresh.text_input(key=keys.KEY_TEXT).value == "the acting was brilliant but the plot was dull"


def test_a_long_text_shows_where_it_was_cut(app, sae_run):
    at = explorer(app)
    # 14,000 characters, as long as IMDb's longest review: analysed, with its cut shown
    at.text_input(key=keys.KEY_TEXT).input(" ".join(["the acting was brilliant but the plot was dull"] * 300)).run()
    assert_clean(at)
    (note,) = [c.value for c in at.caption if "tokens; as in training" in c.value]
    assert "in between left out" in note and "dashed line" in note
    fig = chart(at, SENTENCE)
    (cut,) = [s["x0"] for s in fig["layout"]["shapes"]]  # one line, across every panel
    assert cut == int(cut) + 0.5 and fig["layout"]["shapes"][0]["yref"] == "paper"
    tokens = len(trace(fig, "cosine")["customdata"][0])
    assert tokens == sae_run.manifest()["config"]["model"]["max_length"]
    at.toggle(key=keys.KEY_COMPARE).set_value(True).run()  # half-width charts: the browser thins the labels (test_plots)
    axis = chart(at, SENTENCE)["layout"]["xaxis"]
    assert axis["type"] == "category" and len(axis["labelalias"]) == tokens and "hover for every token" in axis["title"]["text"]
    at.toggle(key=keys.KEY_COMPARE).set_value(False).run()
    at.text_input(key=keys.KEY_TEXT).input("the plot was dull").run()
    assert not [c for c in at.caption if "as in training" in c.value] and "shapes" not in chart(at, SENTENCE)["layout"]


def test_matched_feature_panel(app, sae_run, features_run):
    at = explorer(app)
    at.toggle(key=keys.KEY_EX_MATCHED).set_value(True).run()
    assert_clean(at)
    assert chart(at, "its match")["data"][1]["zmid"] == 0
    at.toggle(key=keys.KEY_COMPARE).set_value(True).run()  # two sentences: their match charts share scales
    assert_clean(at)
    pairs = [f for f in charts(at) if "its match" in title(f)]
    assert len(pairs) == 2
    largest = [np.nanmax(np.concatenate([np.abs(array(f["data"][i]["z"])).ravel() for f in pairs])) for i in (0, 1)]
    for i, end in enumerate((largest[0], max(largest))):  # the difference's end: at least the activations'
        assert pairs[0]["data"][i]["zmax"] == pairs[1]["data"][i]["zmax"] == pytest.approx(end, rel=1e-6), i


def test_a_missing_matching_file_is_one_message_for_two_compared_sentences(app, features_run, tmp_path):
    run = _copy_run(features_run.root, tmp_path / "no_match")
    layer = max(layer for _, layer, _ in features_run.sae_dirs())
    (run / "features" / "matching" / f"layer_{layer}.json").unlink()
    at = explorer(app, run=run)
    at.toggle(key=keys.KEY_EX_MATCHED).set_value(True).run()
    (box,) = at.error
    assert f"no feature matching for layer {layer}" in unescaped(box.value) and "--force" in box.value
    at.toggle(key=keys.KEY_COMPARE).set_value(True).run()
    (box,) = at.error  # once, not once per sentence
    assert f"no feature matching for layer {layer}" in unescaped(box.value)
    assert len([f for f in charts(at) if SENTENCE in title(f)]) == 2 and not [f for f in charts(at) if "its match" in title(f)]


def test_the_feature_card_button_opens_the_chosen_feature_in_the_browser(app, features_run, runs):
    layers = sorted({layer for _, layer, _ in features_run.sae_dirs()})
    at = explorer(app)
    at.selectbox(key=keys.KEY_EX_LAYER).set_value(layers[0]).run()
    at.segmented_control(key=keys.KEY_EX_MODEL).set_value("finetuned").run()
    at.number_input(key=keys.explorer_feature_key(RunFolder(runs["tiny"]), "finetuned", layers[0], "variance")).set_value(5).run()
    at.button(key=keys.KEY_EX_OPEN_CARD).click().run()
    assert_clean(at)
    assert at.title[0].value == "Feature browser"
    assert card_title(at) == f"Feature 5 · fine-tuned SAE · layer {layers[0]}"
    assert at.segmented_control(key=keys.KEY_FB_MODEL).value == "finetuned" and at.selectbox(key=keys.KEY_FB_LAYER).value == layers[0]
    # the table does not scroll to the ticked row: a line says where it is in the ranking
    table = at.dataframe[0].value
    row = int((table["feature"] == 5).to_numpy().nonzero()[0][0])
    assert f"Row {row + 1:,} of {len(table):,} by variance" in [c.value for c in at.caption]


def test_a_top_example_opens_in_the_explorer_with_its_feature(app, features_run):
    """From a feature card, a top example's button puts that whole test text in the explorer with
    the same SAE and feature chosen; the feature fires there, at least as strongly as the card says."""
    from core.data import load_split

    at = browser(app)
    title_ = card_title(at)
    feature, layer = map(int, re.match(r"Feature (\d+) · pre-trained SAE · layer (\d+)", title_).groups())
    buttons = [b for b in at.button if str(b.key).startswith(keys.KEY_FB_OPEN_EXAMPLE)]
    assert buttons
    example = int(buttons[0].label.lstrip("#"))
    buttons[0].click().run()
    assert_clean(at)
    assert at.title[0].value == "Sentence explorer" and not at.toggle(key=keys.KEY_COMPARE).value
    text = load_split(features_run, "test").set_index("id").loc[example, "text"]
    assert at.text_input(key=keys.KEY_TEXT).value == text
    fig = chart(at, SENTENCE)
    assert f"feature {feature} (pre-trained SAE, layer {layer})" in title(fig)
    from core.features_step import feature_card

    peak = max(feature_card(features_run, "pretrained", layer, feature)["top_examples"][0]["activations"])
    assert np.nanmax(array(trace(fig, "feature")["z"])[0]) == pytest.approx(peak, rel=0.02)  # row 0: on the pre-trained model, as the card measured it


def test_the_match_panel_works_from_the_fine_tuned_dictionary_too(app, features_run):
    """With the fine-tuned SAE chosen, the toggle stays and the panel shows the chosen feature's
    pre-trained partner: the same numbers the core computes from that side."""
    from core.analysis import load_bundle, matched_features, sentence_state

    at = explorer(app)
    at.segmented_control(key=keys.KEY_EX_MODEL).set_value("finetuned").run()
    at.toggle(key=keys.KEY_EX_MATCHED).set_value(True).run()
    assert_clean(at)
    fig = chart(at, "its match")
    feature = int(re.match(r"Fine-tuned feature (\d+) and its match: ", title(fig)).group(1))
    layer = int(at.selectbox(key=keys.KEY_EX_LAYER).value)
    bundle = load_bundle(features_run)
    want = matched_features(bundle, sentence_state(bundle, at.text_input(key=keys.KEY_TEXT).value), layer, feature, "finetuned")
    assert "pre-trained" in title(fig) and "fine-tuned feature" not in title(fig).split(":", 1)[1]
    np.testing.assert_allclose(array(fig["data"][0]["z"]), [want["pretrained"], want["finetuned"]], rtol=1e-5, atol=1e-6)


def test_compare_toggle_shows_a_second_sentence(app, sae_run):
    at = explorer(app)
    n = len(charts(at))
    at.toggle(key=keys.KEY_COMPARE).set_value(True).run()
    assert_clean(at)
    assert len(charts(at)) == 2 * n
    figs = [f for f in charts(at) if SENTENCE in title(f)]
    ticks = [xlabels(f) for f in figs]
    assert "brilliant" in ticks[0] and "terrible" in ticks[1]
    assert trace(figs[0], "cosine")["zmin"] == trace(figs[1], "cosine")["zmin"] <= 0  # one colour scale for both sentences
    # every panel's colour scale is shared too, and ends at the largest value of either sentence;
    # the difference's at the activations' end, when that is larger: a small change looks small
    ends = {name: {trace(f, name)["zmax"] for f in figs} for name in ("feature", "difference", "top features")}
    largest = {name: np.nanmax(np.concatenate([np.abs(array(trace(f, name)["z"])).ravel() for f in figs])) for name in ends}
    assert all(len(e) == 1 for e in ends.values()), ends  # one end per panel for both sentences
    (activation,), (difference,) = ends["feature"], ends["difference"]
    assert ends["top features"] == {activation} and activation == pytest.approx(max(largest["feature"], largest["top features"]), rel=1e-6)
    assert difference == pytest.approx(max(largest["difference"], activation), rel=1e-6)
    assert trace(figs[0], "difference")["zmin"] == -trace(figs[0], "difference")["zmax"]
    # half-width charts wrap their titles (Plotly cuts a long one at the chart's edge)
    for f in figs:
        lines = f["layout"]["title"]["text"].split("<br>") + f["layout"]["title"]["subtitle"]["text"].split("<br>")
        assert len(lines) > 2 and max(len(html.unescape(line)) for line in lines) <= 1.3 * plots.NARROW_TITLE_CHARS
        assert f["layout"]["margin"]["t"] > 80  # room for the extra lines
    at.text_input(key=keys.KEY_TEXT_B).input("the plot was dull").run()
    ticks = [xlabels(f) for f in charts(at) if SENTENCE in title(f)]
    assert "terrible" not in ticks[1] and "dull" in ticks[1]
    # stacked: one sentence above the other, each chart full width (wide titles and row labels),
    # the colour scales still shared; a link keeps the layout
    at.toggle(key=keys.KEY_EX_STACK).set_value(True).run()
    assert_clean(at)
    stacked = [f for f in charts(at) if SENTENCE in title(f)]
    assert len(stacked) == 2 and "plot" in xlabels(stacked[1])
    assert [h.value for h in at.subheader][:2] == [shared.safe_text(at.text_input(key=keys.KEY_TEXT).value), "the plot was dull"]
    for f in stacked:
        assert trace(f, "top features")["zmax"] == trace(stacked[0], "top features")["zmax"]
        assert not f["layout"]["yaxis"]["ticktext"][0].startswith("#")  # "feature N": the full width has room
        assert max(len(html.unescape(line)) for line in f["layout"]["title"]["text"].split("<br>")) > plots.NARROW_TITLE_CHARS
    assert at.query_params["stack"] in ("1", ["1"])
    at.toggle(key=keys.KEY_COMPARE).set_value(False).run()
    assert "stack" not in at.query_params  # one sentence: nothing to stack


# ----------------------------------------------------------------------------- feature browser
def browser(app, **kw) -> AppTest:
    at = open_page(app(**kw), FEATURES)
    assert_clean(at)
    return at


def card_title(at: AppTest) -> str:
    return [s.value for s in at.subheader if s.value.startswith("Feature ")][0]


def test_the_card_names_the_class_a_feature_fires_less_on_when_that_sets_its_selectivity(app, tmp_path, tiny_model):
    """Three classes: a feature's selectivity, max |AUROC_c - 0.5|, can come from an AUROC below
    0.5 (it fires less on that class), which "fires most for" does not explain. The card names
    that class, checked against the statistics file; the core helper against hand values."""
    import random

    import pandas as pd

    from core.config import load_config
    from core.features_step import feature_card, feature_table, selectivity_source
    from core.pipeline import build
    from tests.conftest import make_sentence

    assert selectivity_source({"1 star": 0.13, "2": 0.47, "3": 0.53, "4": 0.50, "5 stars": 0.56}) == ("1 star", 0.13)
    assert selectivity_source({"a": 0.13, "b": float("nan"), "c": 0.9}) is None  # the highest is farther
    assert selectivity_source({"negative": 0.3, "positive": 0.7}) is None  # two classes: equally far, never
    rng = random.Random(0)
    rows = [(make_sentence(rng, i % 2), "positive" if i % 2 else "negative") for i in range(240)]
    rows += [(make_sentence(rng, 1).replace(" and ", f" but {rng.choice(['dull', 'boring', 'weak', 'messy'])} and "), "mixed") for _ in range(120)]
    csv = tmp_path / "three.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(csv, index=False)
    run = RunFolder(tmp_path / "three")
    build(run, load_config(preset="tiny", overrides=tiny_overrides(tiny_model, csv)), log=lambda *_: None)
    layer = max(l for m, l, _ in run.sae_dirs() if m == "pretrained")
    table = feature_table(run, "pretrained", layer, by="selectivity")
    found = [(int(f), selectivity_source(feature_card(run, "pretrained", layer, int(f))["selectivity_auroc"])) for f in table["feature"][:40]]
    found = [(f, src) for f, src in found if src]
    assert found, "some of the 40 most selective features fire less on one class"
    feature, (name, auc) = found[0]
    row = table.set_index("feature").loc[feature]
    assert row["selectivity"] == pytest.approx(0.5 - auc, abs=1e-6)  # the class named is the one that sets the score
    at = browser(app, run=run.root)
    at.selectbox(key=keys.KEY_FB_RANK).select("selectivity").run()
    at.selectbox(key=keys.KEY_FB_LAYER).select(layer).run()
    at.number_input(key=keys.browser_feature_key(run, "pretrained", layer, "selectivity")).set_value(feature).run()
    assert_clean(at)
    assert card_title(at).startswith(f"Feature {feature} ")
    lines = [unescaped(m.value) for m in at.markdown if "comes from firing less on" in m.value]
    assert lines == [f"Its selectivity ({row['selectivity']:.2f}) comes from firing less on **{name}** :gray[(one-vs-rest AUROC {auc:.2f})]"]


def test_a_card_whose_logit_contributions_are_all_zero_says_why(app, features_run):
    """A fine-tuned last-layer feature that never fires on [CLS] has no logit effect: the card's
    empty bar chart gets a line saying so; a feature with an effect gets none."""
    from pages.features import NO_LOGIT_EFFECT

    layer = max(l for m, l, _ in features_run.sae_dirs() if m == "finetuned")
    effect = load_stats(features_run, "finetuned", layer)["logit_effect"]  # [d_sae, C]
    zero, moving = int((effect == 0).all(1).nonzero()[0, 0]), int((effect != 0).any(1).nonzero()[0, 0])
    at = browser(app, run=features_run.root)
    at.segmented_control(key=keys.KEY_FB_MODEL).set_value("finetuned").run()
    at.selectbox(key=keys.KEY_FB_LAYER).select(layer).run()
    for feature, said in ((zero, True), (moving, False)):
        at.number_input(key=keys.browser_feature_key(features_run, "finetuned", layer, "variance")).set_value(feature).run()
        assert_clean(at)
        assert card_title(at).startswith(f"Feature {feature} ")
        assert any("Contribution to the class logits" in title(f) for f in charts(at))
        assert (NO_LOGIT_EFFECT in [c.value for c in at.caption]) == said, feature


def test_feature_browser_table_and_card(app, features_run):
    at = browser(app)
    table = at.dataframe[0].value
    assert {"feature", "variance", "density", "selectivity", "best_class"} <= set(table.columns)
    assert list(table["variance"]) == sorted(table["variance"], reverse=True)
    # readable headers (the data and its CSV keep the raw names), one per class for the per-class columns
    labels = {col: c.get("label") for col, c in json.loads(at.dataframe[0].proto.columns or "{}").items()}
    assert labels["best_class"] == "best class"
    per_class = {col: label for col, label in labels.items() if col.startswith("mean[")}
    assert per_class and all(label == f"mean, {col[5:-1]}" for col, label in per_class.items())
    top = int(table["feature"].iloc[0])
    assert card_title(at).startswith(f"Feature {top} · pre-trained SAE")
    assert title(chart(at, "Mean per token, by class"))
    hist = chart(at, "Activation when firing")["data"][0]
    assert hist["type"] == "bar"
    # the tokens where the feature fires, and only those: their count is its density x the test tokens
    tokens = build_report(features_run)["activations"]["test"]["tokens"]
    assert sum(array(hist["y"]).tolist()) == pytest.approx(float(table["density"].iloc[0]) * tokens, abs=0.5)
    html = [m.value for m in at.markdown if "<span" in m.value]
    assert html and all("<script" not in h for h in html)
    assert any(d.proto.label == "Download CSV" for d in at.get("download_button"))



def test_a_feature_that_prefers_no_class_says_so_on_its_card(app, features_run, runs):
    """Its best class is missing in the table (not the string "none", which a class may be called)."""
    at = browser(app)
    table = at.dataframe[0].value
    blank = table[table["best_class"].isna()]
    assert len(blank) and len(blank) < len(table)
    layer = int(at.selectbox(key=keys.KEY_FB_LAYER).value)
    key = keys.browser_feature_key(RunFolder(runs["tiny"]), "pretrained", layer, "variance")
    assert at.dataframe[0].proto.placeholder == "—"  # a missing best class shows a dash, not "None"
    named = table[table["best_class"].notna()]
    for feature, says in ((int(blank["feature"].iloc[0]), "Prefers no class"), (int(named["feature"].iloc[0]), "Fires most for **")):
        at.number_input(key=key).set_value(feature).run()
        assert_clean(at)
        assert card_title(at).startswith(f"Feature {feature} ") and any(m.value.startswith(says) for m in at.markdown), [m.value for m in at.markdown]
    best = named["best_class"].iloc[0]
    auc = load_stats(RunFolder(runs["tiny"]), "pretrained", layer)["selectivity_auroc"][feature, read_json(RunFolder(runs["tiny"]).labels_path)["names"].index(best)]
    assert any(f"Fires most for **{best}** :gray[(one-vs-rest AUROC {auc:.2f} " in m.value for m in at.markdown)  # the basis, with its number

def test_feature_browser_ranking_model_layer_and_feature(app, features_run, runs):
    at = browser(app)
    at.selectbox(key=keys.KEY_FB_RANK).select("density").run()
    table = at.dataframe[0].value
    assert list(table["density"]) == sorted(table["density"], reverse=True)
    assert card_title(at).startswith(f"Feature {int(table['feature'].iloc[0])} ")
    at.selectbox(key=keys.KEY_FB_RANK).select("change").run()  # how far fine-tuning moved each feature
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["change"]) == sorted(table["change"], reverse=True) and table["change"].iloc[0] > 0
    order = list(at.dataframe[0].proto.column_order)  # the ranking's column in view, beside the feature
    assert order[:4] == ["feature", "change", "status", "best_class"] and sorted(order) == sorted(table.columns)
    tiles = {m.label: m.value for m in at.metric}
    assert tiles["change"] == shared.short_number(float(table["change"].iloc[0]))
    at.selectbox(key=keys.KEY_FB_RANK).select("density").run()
    layers = at.selectbox(key=keys.KEY_FB_LAYER).options
    at.selectbox(key=keys.KEY_FB_LAYER).select(int(layers[0])).run()
    assert f"layer {layers[0]}" in card_title(at)
    key = keys.browser_feature_key(RunFolder(runs["tiny"]), "pretrained", int(layers[0]), "density")
    at.number_input(key=key).set_value(3).run()
    assert card_title(at).startswith("Feature 3 ")
    at.segmented_control(key=keys.KEY_FB_MODEL).set_value("finetuned").run()
    assert "fine-tuned SAE" in card_title(at)
    assert_clean(at)
    tiles = {m.label: m.value for m in at.metric if m.label in ("variance", "density", "selectivity")}
    assert tiles and all(len(v) <= 8 for v in tiles.values()), tiles  # a narrow tile must not cut off an exponent


def test_feature_browser_opens_the_matched_partner(app, features_run, monkeypatch, caplog):
    from streamlit.elements.lib import policies

    # Streamlit logs "created with a default value but also had its value set via the Session
    # State API" once per server, and only with a runtime: make both true for this test.
    monkeypatch.setattr(policies.runtime, "exists", lambda: True)
    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    at = browser(app)
    buttons = [b for b in at.button if b.label.startswith("Open ")]
    assert buttons, "the top-variance feature fires, so the one-to-one matching gives it a partner"
    partner = int(re.search(r"feature (\d+)", buttons[0].label).group(1))
    buttons[0].click().run()
    assert_clean(at)
    assert "Session State API" not in caplog.text
    assert card_title(at).startswith(f"Feature {partner} · fine-tuned SAE")


def test_a_lost_features_partner_is_not_called_a_match():
    base = {"feature_finetuned": 476, "similarity": 0.21}
    assert shared.match_caption({**base, "status": "kept", "similarity": 0.83}) == "matched fine-tuned feature 476, decoder cosine 0.83 (kept)"
    lost = shared.match_caption({**base, "status": "lost"})
    assert lost.startswith("no similar fine-tuned feature (lost)") and "assigned partner, feature 476, decoder cosine 0.21" in lost
    assert shared.match_caption({"feature_finetuned": -1, "similarity": None, "status": "dead"}) == "no fine-tuned partner (dead)"
    new = {"sae_model": "finetuned", "feature_pretrained": 12, "feature_finetuned": 3, "similarity": 0.3, "status": "new"}
    assert shared.match_caption(new).startswith("no similar pre-trained feature (new); shown: its assigned partner, feature 12")
    assert shared.match_caption({**new, "status": "kept"}) == "matched pre-trained feature 12, decoder cosine 0.30 (kept)"


def test_the_feature_shown_is_the_row_ticked_in_the_table(app, features_run, runs, monkeypatch):
    """The card's feature is ticked in the table: at first, after a number is typed, and after
    the partner button opens the other SAE's table."""
    from streamlit.elements.lib import policies

    monkeypatch.setattr(policies, "_shown_default_value_warning", False)

    def ticked(at) -> int:
        """The feature of the row ticked in the table on the page (its key ends its widget id)."""
        table = at.dataframe[0]
        key = table.proto.id.split("-")[-1]
        (row,) = at.session_state[key]["selection"]["rows"]
        return int(table.value.iloc[row]["feature"])

    at = browser(app)
    first = int(re.match(r"Feature (\d+)", card_title(at)).group(1))
    assert ticked(at) == first
    run, layer = RunFolder(runs["tiny"]), int(at.selectbox(key=keys.KEY_FB_LAYER).value)
    table = at.dataframe[0].value
    fifth = int(table.iloc[4]["feature"])
    at.number_input(key=keys.browser_feature_key(run, "pretrained", layer, "variance")).set_value(fifth).run()
    assert_clean(at)
    assert card_title(at).startswith(f"Feature {fifth} ") and ticked(at) == fifth
    (button,) = [b for b in at.button if b.label.startswith("Open ")]  # the one-to-one matching gives it a partner
    partner = int(re.search(r"feature (\d+)", button.label).group(1))
    button.click().run()
    assert_clean(at)
    assert card_title(at).startswith(f"Feature {partner} · fine-tuned SAE") and ticked(at) == partner


def test_feature_browser_tables_keep_their_own_row_selection(app, features_run, runs):
    """One table key served every SAE and ranking, so a row checked in one table stayed checked
    in the next; and typing a feature number left the old row checked."""
    at = browser(app)
    ids = {at.dataframe[0].proto.id}
    at.selectbox(key=keys.KEY_FB_RANK).select("density").run()
    ids.add(at.dataframe[0].proto.id)
    layers = at.selectbox(key=keys.KEY_FB_LAYER).options
    at.selectbox(key=keys.KEY_FB_LAYER).select(int(layers[0])).run()
    ids.add(at.dataframe[0].proto.id)
    at.number_input(key=keys.browser_feature_key(RunFolder(runs["tiny"]), "pretrained", int(layers[0]), "density")).set_value(2).run()
    ids.add(at.dataframe[0].proto.id)
    assert_clean(at)
    assert len(ids) == 4  # a fresh table (and selection) for each


def test_feature_card_tokens_are_escaped(app, features_run, monkeypatch):
    import core.features_step

    real = core.features_step.feature_card

    def evil_card(run, model, layer, feature, top=10, **kwargs):
        card = real(run, model, layer, feature, top=top, **kwargs)
        card["top_examples"] = [{"example_id": 1, "label": "<i>neg</i>", "tokens": ["[CLS]", "<script>alert(1)</script>", "<b>x</b>", "##y"], "activations": [0.0, 2.0, 1.0, 0.5], "center": 1}]
        return card

    monkeypatch.setattr(core.features_step, "feature_card", evil_card)
    at = browser(app)
    html = "\n".join(m.value for m in at.markdown if "<span" in m.value)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;x&lt;/b&gt;" in html and "&lt;i&gt;neg&lt;/i&gt;" in html
    assert "<script" not in html and "<b>" not in html and "<i>" not in html


def test_metric_tiles_keep_their_exponent():
    for v in (4.714e-05, -2.051e-05, 0.5, 0.0012345, 0.004467, 0.01635, 0.2042, 123.456, 9876.5, 98765.4, 0.0, 1.0, 3.41248):
        text = shared.short_number(v)
        assert len(text) <= 7 + (v < 0) and float(text) == pytest.approx(v, rel=0.06), (v, text)


def test_dashboard_threads_leave_a_core_to_the_browser(monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_THREADS", "3")
    assert shared.dashboard_threads() == 3
    for value in ("", "zero", "0"):
        monkeypatch.setenv("LAYERSCOPE_THREADS", value)
        monkeypatch.setattr(shared.os, "cpu_count", lambda: 2)
        assert shared.dashboard_threads() == 1
        monkeypatch.setattr(shared.os, "cpu_count", lambda: 8)
        assert shared.dashboard_threads() == 7


def test_the_overview_modules_leave_the_model_and_dataset_code_unloaded():
    """What the overview imports (pages._shared, _keys, _selection, _cached, _background, core.report, core.export, core.plots) loads neither
    transformers nor scikit-learn: those come with the explorer and the feature browser, so the
    first page draws sooner (a report that read similarity.json through core.similarity pulled
    them in)."""
    code = "import sys, pages._shared, pages._keys, pages._selection, pages._cached, pages._background, core.export, core.report, core.plots; print([m for m in ('sklearn', 'transformers', 'core.data', 'core.models') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _prediction_bars(probabilities: dict) -> list[str]:
    """The bar texts ``explorer.prediction`` draws above a full-width chart for these probabilities."""

    def script(probabilities):
        from pages import explorer

        label = max(probabilities, key=probabilities.get)
        explorer.prediction({"prediction": {"label": label, "probabilities": probabilities}, "tokens": ["[CLS]", "a", "[SEP]"], "special": [True, False, True], "unknown_tokens": 0}, columns=True)

    at = AppTest.from_function(script, args=(probabilities,), default_timeout=30).run()
    assert not at.exception, at.exception
    return [b.text for b in at.get("progress")]


def test_prediction_bars_put_values_on_their_own_line_when_a_label_would_wrap():
    """Five to a row, "entertainment: 0.259" wrapped in a 1,024 px window and its bar sat lower
    than the others': then every value goes on its own line (a Markdown line break), so the bars
    stay level; short labels keep one line."""
    long = _prediction_bars({"business": 0.232, "entertainment": 0.259, "politics": 0.192, "sports": 0.157, "tech": 0.160})
    assert long == ["business:  \n0.232", "entertainment:  \n0.259", "politics:  \n0.192", "sports:  \n0.157", "tech:  \n0.160"]
    short = _prediction_bars({f"{n} stars": p for n, p in zip(range(1, 6), (0.048, 0.068, 0.117, 0.191, 0.576))})
    assert short == ["1 stars: 0.048", "2 stars: 0.068", "3 stars: 0.117", "4 stars: 0.191", "5 stars: 0.576"]
    assert _prediction_bars({"entertainment": 0.7, "politics": 0.3}) == ["entertainment: 0.700", "politics: 0.300"]  # two to a row: room enough
