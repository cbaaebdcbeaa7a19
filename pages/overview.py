"""Overview: the run at a glance, fine-tuning results, SAE quality, and the paper's three claims
checked against this run's numbers."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import plots
from core.export import (
    HIGH_SIMILARITY,
    NOT_SUPPORTED,
    SAE_COMPACT,
    SUPPORTED,
    classification_frame,
    layer_groups,
    matching_frame,
    paper_claims,
    quantity_label,
    sae_frame,
    shown,
    summary_rows,
)
from core.report import BARS_TEXT, collapse_note, sae_bar_misses
from pages import _cached as cached
from pages import _keys as keys
from pages import _selection as selection
from pages import _shared as shared


def header(run, rep: dict) -> None:
    """Title, base model and dataset, and the HTML export."""
    left, right = st.columns([3, 1], vertical_alignment="bottom")  # [5, 1] cut the button's label to "HT…" at 1,024 px
    with left:
        st.title("Overview")
        st.caption(shared.safe_text(f"run {selection.run_label(str(run.root))} · base model {rep['base_model']} · dataset {rep['dataset']}"))
    with right:
        problems = rep.get("problems", {})
        st.download_button(
            "HTML report",
            disabled=bool(problems),  # export_html reads strictly: the click would fail with no word on the page
            data=cached.html_report(run, st.session_state.get(keys.KEY_CLAIM_THRESHOLD, HIGH_SIMILARITY)),  # the claims slider below, as last set
            file_name=f"layerscope-{run.name}.html",
            mime="text/html",
            icon=":material/download:",
            help=(
                "one self-contained file with the tables and figures of this run (works offline)"
                if not problems
                else "needs every file of the run readable; fix the files named on this page (python -m core export names the first)"
            ),
            on_click="ignore",
        )


UNTRAINED_HEAD = (
    "the pre-trained encoder with the classification head fine-tuning starts from, freshly initialised (seeded) "
    "and never trained: a chance-level reference, as in the paper's before/after table, not what a probe "
    "trained on the pre-trained encoder would reach"
)


def headline_metrics(rep: dict) -> None:
    """Accuracy before/after fine-tuning, then the sizes of the run, as metric tiles of a fixed
    width in rows that wrap: in a narrow window (1,024 px) fixed columns cut labels and even
    values ("48,…"); these go on to a second line instead."""
    ft = rep.get("finetune")
    if ft:
        with st.container(horizontal=True, wrap=True):
            accuracy = {"width": 220}
            st.metric("Accuracy, pre-trained (chance)", f"{ft['accuracy_pretrained']:.3f}", help=UNTRAINED_HEAD, **accuracy)
            st.metric("Accuracy, fine-tuned", f"{ft['accuracy_finetuned']:.3f}", delta=f"{ft['accuracy_finetuned'] - ft['accuracy_pretrained']:+.3f}", help="the difference: over a chance-level start, not over a trained classifier on the pre-trained encoder", **accuracy)
            st.metric("Macro F1, pre-trained (chance)", f"{ft['macro_f1_pretrained']:.3f}", help=UNTRAINED_HEAD, **accuracy)
            st.metric("Macro F1, fine-tuned", f"{ft['macro_f1_finetuned']:.3f}", delta=f"{ft['macro_f1_finetuned'] - ft['macro_f1_pretrained']:+.3f}", **accuracy)
    rows = rep.get("rows", {})
    tokens = rep.get("activations", {})
    with st.container(horizontal=True, wrap=True):
        size = {"width": 140}
        st.metric("Classes", len(rep.get("labels", [])) or "—", **size)
        st.metric("Layers", rep.get("num_layers", "—"), **size)
        for split in ("train", "val", "test"):
            st.metric(f"{split.capitalize()} rows", f"{rows[split]:,}" if split in rows else "—", **size)
        st.metric("Test tokens", f"{tokens['test']['tokens']:,}" if "test" in tokens else "—", help="tokens of the held-out sample the layer similarity is measured on", **size)


def run_details(rep: dict) -> None:
    """Paths, sizes and step timings as plain tables, folded away."""
    with st.expander("Run details"):
        st.dataframe(pd.DataFrame(summary_rows(rep), columns=["", "value"]), hide_index=True, width="stretch", height="content")
        steps = pd.DataFrame([{"step": k, **v} for k, v in rep.get("steps", {}).items()])
        if len(steps):
            st.dataframe(steps, hide_index=True, width="stretch", height="content")


def finetuning(run, rep: dict) -> None:
    """Per-class classification report (paper Table 2) and grouped bars (paper Fig 6)."""
    st.header("Fine-tuning", divider="gray")
    if not shared.need_step(run, "finetune", "The classification report"):
        return
    cached.report_problem(rep, "finetune")
    per_class = rep["finetune"]["per_class"]
    collapsed = collapse_note(per_class.get("finetuned", {}))
    if collapsed:
        st.warning(shared.safe_message(shared.as_sentence(collapsed) + "."), icon=":material/warning:")
    table = classification_frame(per_class)
    st.caption(f"Test split, {rep['finetune']['test_examples']:,} examples; trained on {rep['finetune']['train_examples']:,}. The pre-trained rows are the pre-trained encoder with an untrained, randomly initialised head: chance level, the starting point of fine-tuning.")
    st.dataframe(shown(table), hide_index=True, width="stretch", height="content", column_config={k: st.column_config.NumberColumn(format="%.3f") for k in ("precision", "recall", "f1")})
    shared.download_csv(table, f"{run.name}-classification.csv", key="dl_classification")
    cols = st.columns(2)
    for col, model in zip(cols, ("pretrained", "finetuned")):
        with col:
            # short enough for a half-width chart at 1,024 px (plots.NARROW_TITLE_CHARS); the legend
            # names precision, recall and F1, the caption above says why "chance"
            title = "pre-trained (chance): scores per class" if model == "pretrained" else f"{shared.MODEL_LABELS[model]}: scores per class"
            shared.chart(plots.classification_bars(per_class[model], title=title), key=f"bars_{model}")


def claims(run, rep: dict) -> None:
    """The paper's three claims, each next to this run's figure, with a verdict from the numbers."""
    st.header("The paper's claims, checked on this run", divider="gray")
    if not shared.need_step(run, "similarity", "Checking the claims"):
        return
    cached.report_problem(rep, "similarity")
    threshold = st.slider(
        "What counts as 'high' similarity (claim 1)",
        0.5,
        1.0,
        HIGH_SIMILARITY,
        0.01,
        key=keys.KEY_CLAIM_THRESHOLD,
        persist_state="session",
        help="claim 1 is supported when every early layer keeps CKA and mean cosine at or above this value",
    )
    rows = rep["similarity"]
    groups = layer_groups(rep["num_layers"])
    for i, claim in enumerate(paper_claims(rows, threshold), start=1):
        text_col, fig_col = st.columns([2, 3])
        with text_col:
            st.markdown(f"**{i}. {claim['claim']}**")
            verdict(claim)
            st.write(claim["explanation"])
            if claim["numbers"]:
                # a static table wraps long quantity names; a data grid scrolled its value column out
                # of sight at 1,400 px (cut to "0.43")
                st.table(numbers_frame(claim["numbers"]), hide_index=True)
        with fig_col:
            fig = plots.claim_figure({run.name: rows}, {claim["key"]: groups[claim["key"]]}, threshold if claim["key"] == "early" else None)
            shared.chart(fig, key=f"claim_{claim['key']}")


def verdict(claim: dict) -> None:
    if claim["verdict"] == SUPPORTED:
        st.success("Supported by this run", icon=":material/check_circle:")
    elif claim["verdict"] == NOT_SUPPORTED:
        st.warning("Not supported by this run", icon=":material/cancel:")
    else:
        st.info(claim["verdict"].capitalize(), icon=":material/help:")


def numbers_frame(numbers: dict) -> pd.DataFrame:
    return pd.DataFrame({"quantity": [quantity_label(k) for k in numbers], "value": [f"{v:.4f}" if isinstance(v, float) else str(v) for v in numbers.values()]})


def _numbers(spec: dict[str, tuple[str, str]]) -> dict:
    """Column configs {column: (label, printf format)}: what the table shows; the data and its CSV keep the raw names."""
    return {col: st.column_config.NumberColumn(label, format=fmt) for col, (label, fmt) in spec.items()}


SAE_COLUMNS = _numbers({
    "d_sae": ("latents", "%d"),
    "l0": ("L0", "%.1f"),
    "fvu": ("FVU", "%.3f"),
    "dead_fraction": ("dead", "%.4f"),
    "accuracy_spliced": ("acc spliced", "%.3f"),
    "kl_spliced": ("KL spliced", "%.4f"),
    "fvu_on_finetuned": ("FVU on fine-tuned", "%.3f"),
    "rare_token_share": ("rare tokens", "%.3f"),
    "rare_error_share": ("their share of the error", "%.3f"),
    "fvu_rare_tokens": ("FVU, rare tokens", "%.3f"),
    "fvu_other_tokens": ("FVU, other tokens", "%.3f"),
})
MATCHING_COLUMNS = _numbers({
    **{k: (k, "%.3f") for k in ("kept", "shifted", "new", "lost")},
    **{f"baseline_{k}": (f"{k}, seed twin", "%.3f") for k in ("kept", "shifted", "new", "lost")},
    "kept_threshold": ("kept if similarity >=", "%.2f"),
    "shifted_threshold": ("shifted if >=", "%.2f"),
})

MATCHING_SHOWN = ("layer", "kept", "shifted", "lost", "new", "baseline_kept", "baseline_shifted", "baseline_lost", "baseline_new")


def saes(run, rep: dict) -> None:
    """SAE quality per (model, layer) and feature matching, when those steps ran."""
    st.header("Sparse autoencoders", divider="gray")
    cached.report_problem(rep, "saes")
    if "saes_missing" in rep.get("problems", {}):  # the table below lacks them
        st.warning(shared.safe_message(rep["problems"]["saes_missing"]))
    if not rep.get("saes"):
        shared.need_step(run, "saes", "The SAE quality table")
        return
    table = sae_frame(rep["saes"])
    st.caption("Held-out tokens. L0: active latents per token; FVU: fraction of variance unexplained; dead: latents that never fired; acc spliced: the fine-tuned classifier's accuracy with that layer's hidden state replaced by the SAE reconstruction (a pre-trained SAE reads the fine-tuned model's hidden state, so its figure includes drift); KL spliced: the mean KL divergence of those class probabilities from the unspliced ones, finer than accuracy on a few hundred texts; FVU on fine-tuned (pre-trained SAEs only): the SAE's FVU on the fine-tuned model's hidden state at the same layer, how far fine-tuning moved that layer away from what the SAE learnt.")
    every = st.toggle(
        "Every column",
        key=keys.KEY_SAE_EVERY_COLUMN,
        persist_state="session",
        help="add MSE, the dense fraction, the split of the error between rare and other tokens, and the settings behind each figure (the CSV always has every column)",
    )
    order = None if every else [c for c in SAE_COMPACT if c in table.columns]
    st.dataframe(shown(table), hide_index=True, width="stretch", height="content", column_config=SAE_COLUMNS, column_order=order, placeholder="—")
    shared.download_csv(table, f"{run.name}-saes.csv", key="dl_saes")
    misses = sae_bar_misses(rep["saes"])
    if misses:
        st.info(
            f"{len(misses)} of {len(rep['saes'])} SAEs miss a quality bar ({BARS_TEXT}), so their features describe the hidden state less faithfully: "
            + "; ".join(m.line for m in misses)
            + "."
            + (" More training tokens and latents lower the FVU (the `quality` preset has both)." if any("fvu" in m.bars for m in misses) else "")
            + (" A lower SAE learning rate (`saes.training.lr`) keeps more latents alive." if any("dead" in m.bars for m in misses) else "")
            + (
                " A pre-trained SAE is spliced into the fine-tuned model, so its accuracy cost includes drift (how far fine-tuning moved that layer): the KL column and the fine-tuned SAE of the same layer tell the two apart."
                if any("spliced" in m.bars and m.model == "pretrained" for m in misses)
                else ""
            ),
            icon=":material/info:",
        )
    if any(s.get("loss_curve") for s in rep["saes"]):
        st.subheader("Training curves")
        st.caption("Training MSE over each logging window; inputs are scaled to unit variance before training, so it reads as the FVU of the training batches. The diamond is the held-out FVU of the table above: its distance to the line's end is the train/test gap, and a line still falling at its end means more steps would help.")
        shared.chart(plots.sae_training_curves(rep["saes"]), key="sae_curves")
    if rep.get("matching"):
        matching(run, rep["matching"])
    elif not run.is_done("features"):  # say where the matching will come from, rather than leave it out
        st.subheader("Feature matching, pre-trained to fine-tuned")
        shared.need_step(run, "features", "Feature matching")


def matching(run, rows: list[dict]) -> None:
    """Kept / shifted / lost per layer as stacked bars beside the seed baseline, then the table."""
    st.subheader("Feature matching, pre-trained to fine-tuned")
    first = rows[0]
    baseline = first.get("baseline_kept") is not None
    st.caption(
        f"Each pre-trained latent is paired one-to-one with a fine-tuned one (Hungarian assignment on decoder cosine similarity): kept if the pair's similarity is at least {first['kept_threshold']:.2f}, shifted if at least {first['shifted_threshold']:.2f}, lost otherwise; 'new' counts the fine-tuned latents left without a similar partner. Every pair that is not similar counts once as lost and once as new, so the two shares are equal unless the SAEs have different numbers of live latents (dead ones are left out)."
        + (" The seed twin is a second pre-trained SAE trained on the same activations with another seed: matching it gives the noise floor, so only a share beyond the twin's says fine-tuning changed the features." if baseline else " This run has no seed baseline, so the noise floor of these shares is unknown.")
    )
    shared.chart(plots.matching_bars(rows), key="matching_bars")
    match = matching_frame(rows)
    order = [c for c in MATCHING_SHOWN if c in match.columns]  # the thresholds are in the caption, the counts in the CSV
    st.dataframe(match, hide_index=True, width="stretch", height="content", column_config=MATCHING_COLUMNS, column_order=order, placeholder="—")
    shared.download_csv(match, f"{run.name}-matching.csv", key="dl_matching")


def body() -> None:
    run = selection.current_run()
    rep = cached.report(run)
    header(run, rep)
    headline_metrics(rep)
    run_details(rep)
    for section in (finetuning, claims, saes):
        shared.guarded(lambda section=section: section(run, rep))


shared.page_main(body)
