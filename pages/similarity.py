"""Layer similarity: every measure per layer, other runs overlaid (optionally on a depth-normalised
axis, as in the paper's Figs 1-2), the layer x layer CKA heatmap, and the table as CSV."""

from __future__ import annotations


import pandas as pd
import streamlit as st

from core import plots
from core.errors import LayerscopeError
from core.runfolder import core_command
from core.similarity import cka_frame
from pages import _cached as cached
from pages import _keys as keys
from pages import _selection as selection
from pages import _shared as shared


def controls(run) -> tuple[list[str], list[str], bool]:
    """Measures, runs to overlay, depth normalisation."""
    others = [p for p in selection.discover_runs() if not selection.same_folder(p, str(run.root))]
    # choices kept for the session, across pages (persist_state); overlays kept only while they exist
    if keys.KEY_SIM_OVERLAY in st.session_state:
        st.session_state[keys.KEY_SIM_OVERLAY] = [p for p in st.session_state[keys.KEY_SIM_OVERLAY] if p in others]
    # the four measure pills get a row of their own: in a third of the page the last one was cut off
    measures = st.pills("Measures", list(plots.MEASURES), selection_mode="multi", default=list(plots.MEASURES), format_func=plots.MEASURE_LABELS.get, key=keys.KEY_SIM_MEASURES, persist_state="session") or []
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    overlay = left.multiselect(
        "Overlay other runs",
        others,
        format_func=selection.run_label,
        key=keys.KEY_SIM_OVERLAY,
        persist_state="session",
        placeholder="other datasets or model sizes" if others else "no other runs found under checkpoints/",
    )
    normalise = right.toggle("Depth-normalised x axis", key=keys.KEY_SIM_NORMALISE, persist_state="session", help="x = layer / number of layers, so models of different depth line up")
    return measures, overlay, normalise


def gather(run, rep: dict, overlay: list[str]) -> tuple[dict, list[dict]]:
    """Similarity rows per run name, and a description of each run shown."""
    runs = {selection.run_label(str(run.root)): rep["similarity"]}
    described = [describe(selection.run_label(str(run.root)), rep)]
    for path in overlay:
        name = selection.run_label(path)
        if name in runs:  # a run of the same folder name outside checkpoints/: its lines must not replace these
            name = shared.display_path(path)
        try:
            other = cached.report_of_path(path)
        except LayerscopeError as exc:
            st.warning(shared.safe_message(f"{name}: {exc}"))
            continue
        if "similarity" in other.get("problems", {}):
            st.warning(shared.safe_message(f"{name}: {other['problems']['similarity']}"))
            continue
        if not other.get("similarity"):
            st.warning(shared.safe_message(f"{name} has no similarity results yet; build it with `{core_command('build', path, '--until', 'similarity')}`"))
            continue
        runs[name] = other["similarity"]
        described.append(describe(name, other))
    return runs, described


def describe(name: str, rep: dict) -> dict:
    ft = rep.get("finetune") or {}
    return {
        "run": name,
        "dataset": rep["dataset"],
        "base model": rep["base_model"],
        "layers": rep.get("num_layers"),
        "classes": len(ft["per_class"]["finetuned"]) if ft.get("per_class") else None,
        "accuracy, fine-tuned": ft.get("accuracy_finetuned"),
        "test tokens": rep.get("similarity_tokens"),
    }


def body() -> None:
    run = selection.current_run()
    rep = cached.report(run)
    st.title("Layer similarity")
    st.caption("Pre-trained vs fine-tuned hidden states on held-out test texts; hidden state 0 is the embedding output, L the last block.")
    if not shared.need_step(run, "similarity", "This page"):
        return
    cached.report_problem(rep, "similarity")
    measures, overlay, normalise = controls(run)
    runs, described = gather(run, rep, overlay)
    if not measures:
        st.info("Pick at least one measure.")
    else:
        # several runs: one panel per measure, one colour per run (one chart of runs x measures lines
        # is hard to read past two runs)
        figure = plots.similarity_by_measure(runs, measures, normalise) if len(runs) > 1 else plots.similarity_curves(runs, measures, normalise)
        shared.chart(figure, key="sim_curves")
    if len(described) > 1:
        st.dataframe(pd.DataFrame(described), hide_index=True, width="stretch", height="content", column_config={"accuracy, fine-tuned": st.column_config.NumberColumn(format="%.3f"), "test tokens": st.column_config.NumberColumn(format="localized")})
    whose = f" ({shared.safe_text(selection.run_label(str(run.root)))})" if len(described) > 1 else ""  # with overlays: the panels below are this run's
    left, right = st.columns([1, 1])
    with left:
        st.subheader(f"CKA between every pair of layers{whose}")
        shared.chart(plots.cka_heatmap(rep["cka_matrix"], title=""), key="sim_cka")
        st.caption("Row i, column j: linear CKA of pre-trained hidden state i with fine-tuned hidden state j.")
    with right:
        st.subheader(f"Table{whose}")
        table = plots.frame_of_similarity(rep["similarity"])
        st.dataframe(table, hide_index=True, width="stretch", height="content", column_config={m: st.column_config.NumberColumn(plots.MEASURE_LABELS[m], format="%.4f") for m in plots.MEASURES if m in table})
        shared.download_csv(table, f"{run.name}-similarity.csv", key="dl_similarity")
        cka = cka_frame(rep["cka_matrix"]).reset_index(names="layer")
        shared.download_csv(cka, f"{run.name}-cka-matrix.csv", label="Download CKA matrix", key="dl_cka")


shared.page_main(body)
