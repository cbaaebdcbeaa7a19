"""What every dashboard page shares: the selected run, cached calls into ``core``, error display,
chart and CSV helpers, and the background build started from the empty state.

This module is the only place that defines ``st.cache_data`` / ``st.cache_resource`` wrappers
and session-state keys. Cached calls take the run *path* plus the manifest's modification time
(``stamp``) so a rebuilt run is read again. The heavier core modules (``core.analysis``,
``core.features_step``, ``core.export``) are imported on use, so a page loads only what it draws.

Environment:
    LAYERSCOPE_RUN          run folder selected when the session starts (else ``?run=`` or the first run found)
    LAYERSCOPE_CHECKPOINTS  folder searched for runs (default: <repo>/checkpoints)
    LAYERSCOPE_BUILD_ARGS   extra arguments for the background ``python -m core build`` (e.g. ``--preset tiny``)
    LAYERSCOPE_THREADS      torch threads for the per-sentence work (default: CPU cores - 1, at least 1)
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import os
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import streamlit as st
import torch

from core.errors import LayerscopeError, user_path
from core.runfolder import MODEL_NAMES, OTHER_MODEL, STEPS, RunFolder, core_command

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_NAME = "default"
CHART_CONFIG = {"toImageButtonOptions": {"format": "png", "scale": 2}, "displaylogo": False}
# Copies of core.analysis.DATASET_RANKINGS and RANKINGS (a test keeps them equal): importing
# core.analysis here would load its model and dataset code (scikit-learn among it) before every
# page's first draw, where only the explorer and the feature browser need it.
RANKINGS = ("variance", "selectivity", "density", "change")
EXPLORER_RANKINGS = (*RANKINGS, "sentence", "sentence-change")
RANKING_LABELS = {"sentence": "sentence variance", "sentence-change": "sentence change"}  # short: they share a row with five other controls
MODEL_LABELS = MODEL_NAMES  # the figures' names for the two models


def dashboard_threads() -> int:
    """Torch threads for the dashboard's forward passes and SAE encodes.

    One core is left to Streamlit's event loop and, usually on the same machine, the browser
    drawing the charts: on 2 cores, two torch threads competing with a busy browser made the
    two forward passes of a sentence 2-3x slower than one thread (``bench/dashboard.py``).
    """
    value = os.environ.get("LAYERSCOPE_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, (os.cpu_count() or 2) - 1)


torch.set_num_threads(dashboard_threads())  # once per server process; the background build is a subprocess with its own


# ----------------------------------------------------------------------------- session-state keys
KEY_RUN = "ls_run"  # path of the selected run (str) or None
KEY_RUN_SELECT = "ls_run_select"  # sidebar selectbox
KEY_RUN_TEXT = "ls_run_text"  # sidebar "other run folder" text box
KEY_RUN_MESSAGE = "ls_run_message"  # message about a run path that could not be opened
KEY_QUERY_RUN = "ls_query_run"  # last ?run= value applied, so it is applied once
KEY_CLAIM_THRESHOLD = "ls_claim_threshold"
KEY_SAE_EVERY_COLUMN = "ls_sae_every_column"  # overview: the SAE table's every-column toggle
KEY_SIM_MEASURES = "ls_sim_measures"
KEY_SIM_OVERLAY = "ls_sim_overlay"
KEY_SIM_NORMALISE = "ls_sim_normalise"
KEY_TEXT = "ls_text"
KEY_TEXT_B = "ls_text_b"
KEY_COMPARE = "ls_compare"
KEY_EX_MODEL = "ls_ex_model"
KEY_EX_LAYER = "ls_ex_layer"
KEY_EX_RANK = "ls_ex_rank"
KEY_EX_TOP = "ls_ex_top"
KEY_EX_MATCHED = "ls_ex_matched"
KEY_FB_MODEL = "ls_fb_model"
KEY_FB_LAYER = "ls_fb_layer"
KEY_FB_RANK = "ls_fb_rank"
KEY_FB_TABLE = "ls_fb_table"  # prefix of the feature table's key (see ``browser_table_key``)


def _run_tag(run: RunFolder) -> str:
    """The run's folder and stamp: a run rebuilt in place (new SAEs) starts fresh picks."""
    return hashlib.sha1(f"{run.root.resolve()}:{run_stamp(str(run.root))}".encode()).hexdigest()[:10]


def explorer_feature_key(run: RunFolder, model: str, layer: int, ranking: str) -> str:
    """Widget key of the explorer's feature picker for one SAE of one run and ranking (each keeps
    its own choice: a feature number picked on one run means nothing on another, and a new
    ranking starts at its own top feature, as in the feature browser)."""
    return f"ls_ex_feature_{_run_tag(run)}_{model}_{layer}_{ranking}"


def browser_feature_key(run: RunFolder, model: str, layer: int, ranking: str) -> str:
    """Widget key of the feature browser's feature picker for one SAE of one run and ranking."""
    return f"ls_fb_feature_{_run_tag(run)}_{model}_{layer}_{ranking}"


def browser_table_key(feature_key: str) -> str:
    """Widget key of the feature browser's table shown with the picker ``feature_key``: one per
    SAE and ranking, renewed whenever the feature is typed in, so a checked row always names the
    feature shown (a row checked in one table stayed checked in every other)."""
    generation = st.session_state.get(f"{feature_key}_typed", 0)
    return f"{KEY_FB_TABLE}_{feature_key}_{generation}"


def feature_typed(feature_key: str) -> None:
    """``on_change`` of a feature picker: drop the table's row selection (see ``browser_table_key``)."""
    st.session_state[f"{feature_key}_typed"] = st.session_state.get(f"{feature_key}_typed", 0) + 1


# ----------------------------------------------------------------------------- runs
def checkpoints_dir() -> Path:
    """Folder searched for runs."""
    return user_path(os.environ.get("LAYERSCOPE_CHECKPOINTS") or ROOT / "checkpoints")


def default_build_target() -> Path:
    return checkpoints_dir() / DEFAULT_RUN_NAME


def display_path(path: Path) -> str:
    """``path`` as a user would type it from the project folder: relative inside it, else absolute."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def discover_runs(base: Path | None = None) -> list[str]:
    """Every folder under ``base`` (two levels deep) holding a manifest.json, sorted by path."""
    base = base or checkpoints_dir()
    found: list[str] = []
    if not base.is_dir():
        return found
    for child in sorted(base.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if RunFolder(child).exists():
            found.append(str(child))
            continue
        found += [str(g) for g in sorted(child.iterdir()) if g.is_dir() and not g.name.startswith(".") and RunFolder(g).exists()]
    return found


def resolve_run_arg(text: str) -> str:
    """A run given as a path (absolute, relative to the working folder or the repo) or a name under checkpoints/."""
    text = text.strip()
    try:
        p = Path(text).expanduser()
    except RuntimeError:  # ~user of no such user: kept as typed, and opening it says what is wrong
        p = Path(text)
    for candidate in (p, ROOT / p, checkpoints_dir() / p):
        with contextlib.suppress(OSError, ValueError):  # a name too long, a folder we may not enter: not this one
            if candidate.is_dir():
                return str(candidate.resolve())
    return str(p)


def run_label(path: str) -> str:
    """Short name of a run: its path relative to checkpoints/ when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(checkpoints_dir().resolve()))
    except ValueError:
        return p.name or str(p)


def run_stamp(path: str) -> int:
    """``RunFolder.stamp``, part of every cache key: a file a step rewrote, or one edited or
    damaged by hand, is read again on the next rerun."""
    return RunFolder(path).stamp()


def set_run(path: str | None) -> None:
    """Select a run for this session and mirror it in the URL."""
    st.session_state[KEY_RUN] = path
    st.session_state[KEY_RUN_MESSAGE] = None
    if path:
        st.query_params["run"] = path
        st.session_state[KEY_QUERY_RUN] = path


def init_run_selection() -> None:
    """Choose the run at session start / when ``?run=`` changes: query param, LAYERSCOPE_RUN, first run found."""
    query = st.query_params.get("run")
    if query and query != st.session_state.get(KEY_QUERY_RUN):
        st.session_state[KEY_QUERY_RUN] = query
        st.session_state[KEY_RUN] = resolve_run_arg(query)
        return
    if KEY_RUN not in st.session_state or st.session_state[KEY_RUN] is None:
        if building(default_build_target()):
            st.session_state[KEY_RUN] = None
            return
        env = os.environ.get("LAYERSCOPE_RUN")
        runs = discover_runs()
        st.session_state[KEY_RUN] = resolve_run_arg(env) if env else (runs[0] if runs else None)


def selected_run_path() -> str | None:
    return st.session_state.get(KEY_RUN)


def current_run() -> RunFolder:
    """The selected run; raises LayerscopeError when none is selected or it cannot be read."""
    path = selected_run_path()
    if not path:
        raise LayerscopeError("no run selected; pick one in the sidebar or build one with `python -m core build --run checkpoints/default`")
    run = RunFolder(path)
    run.manifest()
    return run


def _select_from_box() -> None:
    set_run(st.session_state[KEY_RUN_SELECT])


def _select_from_text() -> None:
    text = (st.session_state.get(KEY_RUN_TEXT) or "").strip()
    if not text:
        return
    path = resolve_run_arg(text)
    try:
        found = RunFolder(path).exists()
    except (OSError, ValueError) as e:  # a name too long, a folder we may not enter, a NUL character
        st.session_state[KEY_RUN_MESSAGE] = f"{text} cannot be opened ({getattr(e, 'strerror', None) or e}); type the path of a run folder you can read"
        return
    except LayerscopeError as e:  # ~user of no such user
        st.session_state[KEY_RUN_MESSAGE] = str(e)
        return
    if found:
        set_run(path)
        st.session_state[KEY_RUN_TEXT] = ""
    else:
        st.session_state[KEY_RUN_MESSAGE] = f"{text} is not a Layerscope run (no manifest.json there)"


def run_picker() -> None:
    """Sidebar: a select box of runs under checkpoints/ plus a text box for any other run folder."""
    runs = discover_runs()
    current = selected_run_path()
    options = runs + ([current] if current and current not in runs else [])
    with st.sidebar:
        st.subheader("Run")
        if options:
            st.session_state[KEY_RUN_SELECT] = current if current in options else options[0]
            st.selectbox("Run folder", options, key=KEY_RUN_SELECT, format_func=run_label, on_change=_select_from_box)
        st.text_input("Other run folder", key=KEY_RUN_TEXT, placeholder="/path/to/run", on_change=_select_from_text, help="any folder built by `python -m core build`; press Enter")
        message = st.session_state.get(KEY_RUN_MESSAGE)
        if message:
            st.warning(safe_message(message))
        if current:
            st.caption(steps_line(current))


def steps_line(path: str) -> str:
    """Which pipeline steps the run has finished, for the sidebar, and whether a build is at work
    in it now (a flock held by another process: a few microseconds to ask)."""
    try:
        run = RunFolder(path)
        done = run.manifest().get("steps", {})
    except LayerscopeError:
        return "not a readable run"
    missing = [s for s in STEPS if s not in done]
    line = "Steps done: " + (", ".join(s for s in STEPS if s in done) or "none") + (f". Missing: {', '.join(missing)}" if missing else "")
    return line + (". A build is running in this run now: reload the page to see the steps it finishes" if run.held_elsewhere() else "")


# ----------------------------------------------------------------------------- page entry
def started_outside_app() -> bool:
    """True when Streamlit ran a page file directly (its legacy ``pages/`` mode, on the first request
    of a fresh server to a page URL such as ``/explorer``) instead of through app.py's navigation."""
    from streamlit.runtime.pages_manager import PagesManager

    return bool(PagesManager.uses_pages_directory)


def page_main(body: Callable[[], None]) -> None:
    """Entry point of every page file: run ``body`` (errors shown, never raised), or hand the
    request to app.py when Streamlit started the page without it."""
    if started_outside_app():
        import runpy

        runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
    else:
        run_page(body)


# ----------------------------------------------------------------------------- errors and page bodies
def show_error(exc: BaseException) -> None:
    """A LayerscopeError as its own message; anything else as a short note plus details in an expander."""
    if isinstance(exc, LayerscopeError):
        st.error(safe_message(exc), icon=":material/error:")
        return
    st.error(f"Something went wrong while drawing this part of the page ({type(exc).__name__}). The rest of the dashboard still works.", icon=":material/bug_report:")
    with st.expander("Details for a bug report"):
        st.code("".join(traceback.format_exception(exc)), language="text")


def run_page(body: Callable[[], None]) -> bool:
    """Run a page body, turning exceptions into ``show_error`` boxes instead of a traceback;
    False when it failed."""
    try:
        body()
    except Exception as exc:  # noqa: BLE001 - every failure is shown to the viewer, none is swallowed
        show_error(exc)
        return False
    return True


def guarded(part: Callable[[], None]) -> bool:
    """Like ``run_page`` for one independent section, so one failing panel leaves the others visible."""
    return run_page(part)


def chart(fig, key: str | None = None) -> None:
    """Every chart goes through here: PNG export button at 2x, no Plotly logo."""
    st.plotly_chart(fig, width="stretch", config=CHART_CONFIG, key=key)


def download_csv(df: pd.DataFrame, file_name: str, label: str = "Download CSV", key: str | None = None) -> None:
    """A download button for ``df`` as CSV."""
    st.download_button(label, df.to_csv(index=False).encode("utf-8"), file_name=file_name, mime="text/csv", key=key, icon=":material/download:", on_click="ignore")


def safe_text(text) -> str:
    """User text for ``st.markdown``: HTML escaped and markdown control characters neutralised."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|>~$])", r"\\\1", html.escape(str(text), quote=False))


def safe_message(text) -> str:
    """A message for ``st.error``/``st.warning`` (rendered as markdown) that may quote what a user
    typed (a run path, a class name): ``safe_text`` outside its `code spans`, which stay code spans
    (markdown leaves their insides alone). Unbalanced backticks: all of it through ``safe_text``."""
    parts = str(text).split("`")
    if len(parts) % 2 == 0:
        return safe_text(text)
    return "".join(f"`{part}`" if i % 2 else safe_text(part) for i, part in enumerate(parts))


def need_step(run: RunFolder, step: str, what: str) -> bool:
    """True when ``step`` is done; else an info box saying how to build it."""
    if run.is_done(step):
        return True
    if run.held_elsewhere():  # a build is running in this run: it will write the step
        st.info(f"{what} needs the '{step}' step, which a build running in this run has not finished yet; reload this page when it has.", icon=":material/hourglass_top:")
        return False
    st.info(f"{what} needs the '{step}' step, which has not run for this run yet. Build it (and any step before it that is missing) with:", icon=":material/info:")
    st.code(core_command("build", run.root, "--until", step), language="bash")
    return False


# ----------------------------------------------------------------------------- cached core calls
@st.cache_data(show_spinner=False, max_entries=32)
def _report(path: str, stamp: int) -> dict:
    from core.report import build_report

    return build_report(RunFolder(path), lenient=True)


def report_of_path(path: str) -> dict:
    """``build_report(run, lenient=True)``: a damaged file leaves out the parts that read it (their
    messages in ``problems``, see ``report_problem``). Cached until a file of the run changes
    (``run_stamp``), so a file put right by hand shows on the next rerun."""
    return _report(path, run_stamp(path))


def report(run: RunFolder) -> dict:
    return report_of_path(str(run.root))


def report_problem(rep: dict, part: str) -> None:
    """Raise the message of a report part that could not be read ("finetune", "similarity",
    "saes", ...), for ``guarded`` to show in place of the section that needs that part."""
    problem = rep.get("problems", {}).get(part)
    if problem:
        raise LayerscopeError(problem)


def html_report(run: RunFolder, threshold: float) -> Callable[[], str]:
    """Deferred ``export_html(run, threshold)`` for ``st.download_button``: built only when clicked."""
    path = str(run.root)

    def make() -> str:
        from core.export import export_html

        return export_html(RunFolder(path), threshold)

    return make


@st.cache_resource(show_spinner="Loading models and SAEs ...", max_entries=2)
def _bundle(path: str, stamp: int):
    from core.analysis import load_bundle

    return load_bundle(RunFolder(path))


def short_number(v: float) -> str:
    """At most 7 characters (8 when negative), so a metric tile a quarter of the feature card wide
    never cuts a value off (4.714e-05 showed as "4.714...", 0.004467 as "0.004..."): three
    significant digits below 1, four from 1 to 10,000, one decimal of a power of ten outside 0.01-10,000."""
    if v and not 1e-2 <= abs(v) < 1e4:
        return f"{v:.1e}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"


def bundle(run: RunFolder):
    """Tokenizer, both models and every SAE of the run (loaded once per run and server)."""
    return _bundle(str(run.root), run_stamp(str(run.root)))


@st.cache_resource(show_spinner="Running both models on the sentence ...", max_entries=32)
def _sentence_state(path: str, stamp: int, text: str):
    """Both models' forward passes for one sentence (kept unpickled: it holds every hidden state)."""
    from core.analysis import sentence_state

    return sentence_state(_bundle(path, stamp), text)


@st.cache_data(show_spinner="Analysing the sentence ...", max_entries=64)
def _analysis(path: str, stamp: int, text: str, top: int, rank_by: str, sae: tuple[str, int] | None) -> dict:
    from core.analysis import analyze_text

    return analyze_text(_bundle(path, stamp), text, top=top, rank_by=rank_by, state=_sentence_state(path, stamp, text), saes=[sae] if sae else [])


def analysis(run: RunFolder, text: str, top: int, rank_by: str, sae: tuple[str, int] | None) -> dict:
    """``analyze_text`` for one sentence, cached by text, with the top features of one (model, layer)
    SAE only (``None``: none); the forward passes are shared by every SAE choice."""
    return _analysis(str(run.root), run_stamp(str(run.root)), text, top, rank_by, sae)


@st.cache_data(show_spinner=False, max_entries=128)
def _sentence_features(path: str, stamp: int, text: str, layer: int, feature: int, sae_model: str) -> dict:
    from core.analysis import sentence_features

    return sentence_features(_bundle(path, stamp), _sentence_state(path, stamp, text), layer, feature, sae_model=sae_model)


def sentence_features(run: RunFolder, text: str, layer: int, feature: int, sae_model: str) -> dict:
    """One SAE feature per token for both models' hidden states, cached by text."""
    return _sentence_features(str(run.root), run_stamp(str(run.root)), text, layer, feature, sae_model)


@st.cache_data(show_spinner=False, max_entries=128)
def _matched_features(path: str, stamp: int, text: str, layer: int, feature: int, sae_model: str) -> dict:
    from core.analysis import matched_features

    return matched_features(_bundle(path, stamp), _sentence_state(path, stamp, text), layer, feature, sae_model)


def matched_features(run: RunFolder, text: str, layer: int, feature: int, sae_model: str = "pretrained") -> dict:
    """A feature of ``sae_model``'s SAE on that model next to its matched partner on the other model."""
    return _matched_features(str(run.root), run_stamp(str(run.root)), text, layer, feature, sae_model)


@st.cache_data(show_spinner="Reading feature statistics ...", max_entries=16)
def _feature_table(path: str, stamp: int, model: str, layer: int, by: str) -> pd.DataFrame:
    from core.features_step import feature_table

    return feature_table(RunFolder(path), model, layer, by=by)


def feature_table(run: RunFolder, model: str, layer: int, by: str = "variance") -> pd.DataFrame:
    """One row per feature of the (model, layer) SAE, best first by ``by``."""
    return _feature_table(str(run.root), run_stamp(str(run.root)), model, layer, by)


@st.cache_data(show_spinner=False, max_entries=128)
def _feature_card(path: str, stamp: int, model: str, layer: int, feature: int, top: int | None) -> dict:
    from core.features_step import feature_card

    return feature_card(RunFolder(path), model, layer, feature, top=top)


def feature_card(run: RunFolder, model: str, layer: int, feature: int, top: int | None = None) -> dict:
    return _feature_card(str(run.root), run_stamp(str(run.root)), model, layer, feature, top)


def match_caption(m: dict) -> str:
    """What the matching says of a feature (of the SAE ``m["sae_model"]``, pre-trained by default):
    its partner is a match only when kept or shifted; the one-to-one partner of a lost (or new)
    feature is shown, but named as not similar."""
    mine = m.get("sae_model", "pretrained")
    other = OTHER_MODEL[mine]
    partner, sim, status, name = m[f"feature_{other}"], m.get("similarity"), m.get("status", ""), MODEL_LABELS[other]
    cosine = f", decoder cosine {sim:.2f}" if sim is not None else ""
    if partner < 0:
        return f"no {name} partner ({status})"
    if status in ("kept", "shifted"):
        return f"matched {name} feature {partner}{cosine} ({status})"
    return f"no similar {name} feature ({status}); shown: its assigned partner, feature {partner}{cosine}"


def sae_layers(run: RunFolder, model: str) -> list[int]:
    """Layers with a trained SAE for ``model``."""
    return [layer for m, layer, _ in run.sae_dirs() if m == model]


# ----------------------------------------------------------------------------- background build
STEP_LINE = re.compile(r"^\[(\w+)\]\s+(running|finished|already done)")
PERCENT = re.compile(r"(\d{1,3})%\|")


def parse_build_log(text: str) -> dict:
    """Progress of ``python -m core build`` from its output: steps done, step running, tqdm percent.

    ``fraction`` counts finished steps plus the running step's last tqdm percentage.
    """
    done: list[str] = []
    current, percent, error = None, None, None
    for line in re.split(r"[\r\n]+", text):
        line = line.strip()
        m = STEP_LINE.match(line)
        if m:
            step, what = m.groups()
            if what == "running":
                current, percent = step, None
            else:
                if step not in done:
                    done.append(step)
                if current == step:
                    current, percent = None, None
            continue
        if line.startswith("error:"):
            error = line[len("error:") :].strip()
        p = PERCENT.findall(line)
        if p and current:
            percent = min(100, int(p[-1]))
    partial = (percent or 0) / 100 if current else 0.0
    fraction = min(1.0, (len(done) + partial) / len(STEPS))
    return {"done": done, "current": current, "percent": percent, "fraction": fraction, "error": error}


def build_command(target: Path) -> list[str]:
    extra = shlex.split(os.environ.get("LAYERSCOPE_BUILD_ARGS", ""))
    return [sys.executable, "-m", "core", "build", "--run", str(target), *extra]


def build_log_path(target: Path) -> Path:
    """The build's log sits next to the run folder (in its parent), not inside it."""
    return target.parent / f"build-{target.name}.log"


@st.cache_resource(show_spinner=False)
def _builds() -> dict:
    """Background builds of this server, by run path: {"process", "log"}."""
    return {}


def start_build(target: Path) -> None:
    """Start ``python -m core build --run target`` in the background (one at a time per target)."""
    builds = _builds()
    running = builds.get(str(target))
    if running and running["process"].poll() is None or RunFolder(target).held_elsewhere():
        return  # building already, here or in another process (whose log this must not truncate)
    log = build_log_path(target)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("TQDM_DISABLE", None)  # the page's progress bar reads the build's tqdm bars from the log
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(build_command(target), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    builds[str(target)] = {"process": process, "log": log}


def build_state(target: Path) -> dict | None:
    """None when no build of ``target`` was started by this server, else its parsed progress plus
    ``running`` (bool), ``returncode`` and ``log_tail``."""
    entry = _builds().get(str(target))
    if entry is None:
        return None
    try:
        text = entry["log"].read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    state = parse_build_log(text)
    code = entry["process"].poll()
    tail = "\n".join(l for l in re.split(r"[\r\n]+", text)[-15:])
    return {**state, "running": code is None, "returncode": code, "log_tail": tail, "log": str(entry["log"])}


def building(target: Path) -> bool:
    """True while this server runs a build of ``target``."""
    entry = _builds().get(str(target))
    return entry is not None and entry["process"].poll() is None


def forget_build(target: Path) -> None:
    _builds().pop(str(target), None)

