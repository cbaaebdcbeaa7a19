"""Layerscope dashboard: ``streamlit run app.py``.

Which run is shown (first match wins):
  1. ``?run=PATH`` in the URL (a path, or a run name under checkpoints/), applied when it changes;
  2. the run picked in the sidebar, remembered for the session;
  3. the ``LAYERSCOPE_RUN`` environment variable;
  4. the first folder under checkpoints/ holding a manifest.json
     (``LAYERSCOPE_CHECKPOINTS`` points the search at another folder).

Tests use ``LAYERSCOPE_RUN`` (or ``AppTest.query_params["run"]``) to open the tiny test run.
With no run at all, the start page offers to build ``checkpoints/default`` in the background
(``LAYERSCOPE_BUILD_ARGS`` adds options to that build, e.g. ``--preset tiny``).
"""

from __future__ import annotations

import shlex

import streamlit as st

from core.runfolder import STEPS, RunFolder
from pages import _background as background
from pages import _keys as keys
from pages import _selection as selection
from pages import _shared as shared

st.set_page_config(page_title="Layerscope", page_icon="🔬", layout="wide")

PAGES = [
    st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("pages/similarity.py", title="Layer similarity", icon=":material/stacked_line_chart:"),
    st.Page("pages/explorer.py", title="Sentence explorer", icon=":material/text_fields:"),
    st.Page("pages/features.py", title="Feature browser", icon=":material/grid_view:"),
]


@st.fragment(run_every=1.0)
def build_progress(target_path: str) -> None:
    """Poll the background build: a progress bar from its log; show the run once it is done."""
    from pathlib import Path

    target = Path(target_path)
    state = background.build_state(target)
    if state is None:
        return
    if state["running"]:
        step = state["current"] or (state["done"][-1] if state["done"] else "starting")
        percent = f" {state['percent']}%" if state["percent"] is not None else ""
        st.progress(state["fraction"], text=f"Building: step '{step}'{percent} ({len(state['done'])} of {len(STEPS)} steps finished)")
        with st.expander("Build log"):
            st.code(state["log_tail"] or "(no output yet)", language="text")
        return
    background.forget_build(target)
    if state["returncode"] != 0:
        reason = state["error"] or f"exit code {state['returncode']}"
        if RunFolder(target).exists():
            selection.set_run(str(target))
            st.session_state[keys.KEY_RUN_MESSAGE] = f"the build stopped early ({reason}); showing the steps that finished. Log: {state['log']}"
            st.rerun(scope="app")
        st.error(shared.safe_message(f"The build failed: {reason}"))
        st.code(state["log_tail"], language="text")
        return
    selection.set_run(str(target))
    st.rerun(scope="app")


def start_page() -> None:
    """Shown when no run exists yet: how to build one, and a button that builds it here."""
    st.title("Layerscope")
    st.write(
        "Layerscope fine-tunes a BERT classifier and compares the pre-trained and fine-tuned models "
        "layer by layer (cosine similarity, CKA) and with sparse autoencoders. No run was found yet "
        f"in {shared.checkpoints_dir()}."
    )
    target = shared.default_build_target()
    shown = shared.display_path(target)  # LAYERSCOPE_CHECKPOINTS may put it outside checkpoints/
    st.write("Build the default run from a terminal:")
    st.code(f"python -m core build --run {shlex.quote(shown)}", language="bash")
    st.write("or build it from here; the dashboard follows its progress and opens the run when it is done.")
    if background.build_state(target) is None:
        if RunFolder(target).held_elsewhere():  # `python -m core build` in a terminal, or another dashboard's build
            st.info(f"{shown} is being built by another process right now. Reload this page in a moment: once that build has written the run's manifest (at the start of its first step), the dashboard opens the run and shows each step as it finishes.", icon=":material/hourglass_top:")
            return
        if st.button(f"Build {shown}", type="primary", icon=":material/play_arrow:"):
            background.start_build(target)
            st.rerun()
        st.caption(f"The build log is written to {background.build_log_path(target)}.")
        return
    build_progress(str(target))


def main() -> None:
    if not shared.run_page(shared.checkpoints_dir):  # LAYERSCOPE_CHECKPOINTS=~nosuchuser/...: its message, then stop
        st.stop()
    selection.init_run_selection()
    selection.run_picker()
    if selection.selected_run_path() is None:
        page = st.navigation([st.Page(start_page, title="Get started", icon=":material/rocket_launch:", url_path="start")])
    else:
        page = st.navigation(PAGES)
    page.run()


main()
