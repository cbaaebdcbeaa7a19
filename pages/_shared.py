"""What every dashboard page shares: paths, error display, chart and CSV helpers, escaping of
what a user typed, the "build this step first" box and the figures' short labels.

The rest of the dashboard's plumbing has a module each: ``_keys`` (session-state keys),
``_selection`` (which run the session shows), ``_cached`` (cached calls into ``core``) and
``_background`` (the build the start page runs).

Environment:
    LAYERSCOPE_RUN          run folder selected when the session starts (else ``?run=`` or the first run found)
    LAYERSCOPE_CHECKPOINTS  folder searched for runs (default: <repo>/checkpoints)
    LAYERSCOPE_BUILD_ARGS   extra arguments for the background ``python -m core build`` (e.g. ``--preset tiny``)
    LAYERSCOPE_THREADS      torch threads for the per-sentence work (default: CPU cores - 1, at least 1)
"""

from __future__ import annotations

import html
import os
import re
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import streamlit as st
import torch

from core.errors import LayerscopeError, user_path
from core.runfolder import MODEL_NAMES, OTHER_MODEL, RunFolder, core_command

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


# ----------------------------------------------------------------------------- paths
def checkpoints_dir() -> Path:
    """Folder searched for runs."""
    return user_path(os.environ.get("LAYERSCOPE_CHECKPOINTS") or ROOT / "checkpoints")


def default_build_target() -> Path:
    return checkpoints_dir() / DEFAULT_RUN_NAME


def display_path(path: Path) -> str:
    """``path`` as a user would type it from the project folder: relative inside it, else absolute."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_stamp(path: str) -> int:
    """``RunFolder.stamp``, part of every cache key: a file a step rewrote, or one edited or
    damaged by hand, is read again on the next rerun."""
    return RunFolder(path).stamp()


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
    if isinstance(exc, PermissionError):  # a folder or file of the run this user may not read: a setting to change, not a bug
        where = exc.filename or "a file of the run"
        st.error(safe_message(f"cannot read {where}: permission denied; give your user read access to it (`chmod u+rx` for a folder, `u+r` for a file), or run the dashboard as its owner"), icon=":material/lock:")
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


def as_sentence(note: str) -> str:
    """A note ``core`` words as a clause ("the classifier recalls ...") with its first letter raised, to open a box."""
    return note[:1].upper() + note[1:]


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


# ----------------------------------------------------------------------------- labels
def short_number(v: float) -> str:
    """At most 7 characters (8 when negative), so a metric tile a quarter of the feature card wide
    never cuts a value off (4.714e-05 showed as "4.714...", 0.004467 as "0.004..."): three
    significant digits below 1, four from 1 to 10,000, one decimal of a power of ten outside 0.01-10,000."""
    if v and not 1e-2 <= abs(v) < 1e4:
        return f"{v:.1e}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"


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
