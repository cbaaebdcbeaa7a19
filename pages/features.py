"""Feature browser: the ranked features of one SAE, and a card per feature with its top activating
examples in context, activation histogram, mean activation per class and its matched feature in
the other model."""

from __future__ import annotations

import math
import re

import pandas as pd
import streamlit as st

from core import plots
from core.features_step import CLASS_PREFERENCE, selectivity_source
from core.runfolder import OTHER_MODEL, core_command
from pages import _cached as cached
from pages import _keys as keys
from pages import _selection as selection
from pages import _shared as shared

TILE_HELP = {"change": ": the mean over the test tokens of |fine-tuned − pre-trained| activation, this SAE applied to both models' hidden states (how far fine-tuning moved the feature)"}
STATUS_HELP = {
    "kept": "a partner with a very similar decoder direction exists in the other model",
    "shifted": "the nearest partner is only moderately similar",
    "new": "no similar feature in the pre-trained SAE: fine-tuning created it",
    "lost": "no similar feature in the fine-tuned SAE: fine-tuning removed it",
    "dead": "this feature never fires",
}


def pickers(run) -> tuple[str, int | None, str]:
    """Model, layer (of that model's SAEs) and ranking."""
    models = [m for m in shared.MODEL_LABELS if shared.sae_layers(run, m)]
    if not models:
        return "pretrained", None, "variance"
    c1, c2, c3 = st.columns([1.2, 1, 1], vertical_alignment="bottom")  # the model control whole at 1,024 px
    # Set through session state rather than a widget default: "Open feature ..." sets them too, and
    # Streamlit warns when a widget has both. Kept for the session, across pages (persist_state).
    if st.session_state.get(keys.KEY_FB_MODEL) not in models:
        st.session_state[keys.KEY_FB_MODEL] = models[0]
    model = c1.segmented_control("Model", models, format_func=shared.MODEL_LABELS.get, key=keys.KEY_FB_MODEL, required=True, persist_state="session") or models[0]
    layers = shared.sae_layers(run, model)
    if st.session_state.get(keys.KEY_FB_LAYER) not in layers:
        st.session_state[keys.KEY_FB_LAYER] = layers[-1]
    layer = c2.selectbox("Layer (hidden state)", layers, key=keys.KEY_FB_LAYER, persist_state="session")
    ranking = c3.selectbox(
        "Rank by",
        shared.RANKINGS,
        key=keys.KEY_FB_RANK,
        persist_state="session",
        help="over the test tokens: variance (the paper's ranking), selectivity (the largest distance of a one-vs-rest AUROC from 0.5: a feature that fires more, or less, on one class), density (share of tokens it fires on), change (mean |fine-tuned − pre-trained| activation, this SAE applied to both models: the features fine-tuning moved most)",
    )
    return model, layer, ranking


def table_columns(table: pd.DataFrame) -> dict:
    """Column configs for the feature table: readable headers ("mean, negative" for
    ``mean[negative]``), four decimals for measures; the data and its CSV keep the raw names."""
    out = {}
    for col in table.columns:
        label = re.sub(r"^(mean|logit_effect)\[(.*)\]$", lambda m: f"{m[1].replace('_', ' ')}, {m[2]}", col).replace("best_class", "best class")
        if table[col].dtype.kind == "f":
            out[col] = st.column_config.NumberColumn(label, format="%.4f")
        elif label != col:
            out[col] = st.column_config.Column(label)
    return out


def table_order(table: pd.DataFrame, ranking: str) -> list[str]:
    """Columns in reading order for a narrow table: the feature, what it is ranked by, its match
    status and best class first (the rest scroll into view; the CSV keeps the data's order)."""
    first = [c for c in ("feature", ranking, "status", "best_class") if c in table.columns]
    return first + [c for c in table.columns if c not in first]


def _pick_row(table: pd.DataFrame, key: str, table_key: str) -> None:
    rows = st.session_state[table_key].selection.rows
    if rows:
        st.session_state[key] = int(table.iloc[rows[0]]["feature"])


def feature_list(run, model: str, layer: int, table: pd.DataFrame, ranking: str) -> int:
    """The feature number input, the ranked table (click a row to open it) and its CSV."""
    key = keys.browser_feature_key(run, model, layer, ranking)
    if key not in st.session_state:
        st.session_state[key] = int(table.iloc[0]["feature"]) if len(table) else 0
    feature = st.number_input(
        "Feature",
        min_value=0,
        max_value=max(0, len(table) - 1),
        step=1,
        key=key,
        on_change=keys.feature_typed,
        args=(key,),
        persist_state="session",
        help=f"0 to {max(0, len(table) - 1):,}; starts at the top feature by {ranking}; or tick a row's box in the table",
    )
    table_key = keys.browser_table_key(key)
    shown = [i for i, f in enumerate(table["feature"]) if f == feature][:1]  # the row's position
    # where the feature sits in the ranking: the table does not scroll to a row ticked from
    # elsewhere ("Feature card", a partner), and the line keeps the table's toolbar off the input
    st.caption(f"Row {shown[0] + 1:,} of {len(table):,} by {ranking}" if shown else f"Not in this table ({len(table):,} features)")
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        height=420,
        key=table_key,
        on_select=lambda: _pick_row(table, key, table_key),
        selection_mode="single-row",
        selection_default={"selection": {"rows": shown}},  # a new table (see browser_table_key) ticks the feature shown
        column_config=table_columns(table),
        column_order=table_order(table, ranking),
        placeholder="—",  # a best class or match similarity that is missing, not the word "None"
    )
    shared.download_csv(table, f"{run.name}-features-{model}-layer{layer}-by-{ranking}.csv", key="dl_features")
    return int(feature)


def _open_partner(run, model: str, layer: int, partner: int) -> None:
    other = OTHER_MODEL[model]
    st.session_state[keys.KEY_FB_MODEL] = other
    st.session_state[keys.KEY_FB_LAYER] = layer
    key = keys.browser_feature_key(run, other, layer, st.session_state.get(keys.KEY_FB_RANK, shared.RANKINGS[0]))
    st.session_state[key] = partner
    keys.feature_typed(key)  # a fresh table, its partner's row ticked


def match_box(run, model: str, layer: int, match: dict | None, problem: str | None = None) -> None:
    """The matched feature in the other model, its similarity and status (``problem``: why the
    layer's matching file cannot be read)."""
    if problem:  # its message is above the table
        st.caption("No match shown: this layer's matching file cannot be read (see the message above the table).")
        return
    if not match:
        st.caption("No matching information for this feature.")
        return
    status = str(match.get("status", ""))
    partner = match.get("partner")
    sim = match.get("similarity")
    other = shared.MODEL_LABELS[OTHER_MODEL[model]]
    similar = status in ("kept", "shifted")  # a lost or new feature's one-to-one partner is not similar to it
    with st.container(horizontal=True, wrap=True):  # fixed-width tiles that wrap: a third of a narrow card cut "Assigned p…"
        tile = {"width": 150}
        st.metric(  # a short label: "... in fine-tuned" would not fit
            "Partner" if similar else "Assigned partner",
            "none" if partner is None or int(partner) < 0 else int(partner),
            help=f"its partner in the {other} SAE" if similar else f"the one-to-one assignment pairs every feature with one in the {other} SAE, but this pair's decoder directions are not similar: it is no match",
            **tile,
        )
        st.metric("Similarity", "—" if sim is None or (isinstance(sim, float) and math.isnan(sim)) else f"{float(sim):.3f}", **tile)
        st.metric("Status", status or "—", help=STATUS_HELP.get(status), **tile)
    if partner is not None and int(partner) >= 0 and layer in shared.sae_layers(run, OTHER_MODEL[model]):
        # short enough for a narrow card (1,024 px); the tile above says "Assigned partner"
        label = f"Open feature {int(partner)} in the {other} SAE" if similar else f"Open feature {int(partner)}, {other} (not similar)"
        st.button(label, on_click=_open_partner, args=(run, model, layer, int(partner)), icon=":material/swap_horiz:")


def top_examples(card: dict) -> None:
    """Top activating examples with every token shaded by its activation (escaped HTML)."""
    examples = card.get("top_examples") or []
    if not examples:
        st.caption("This feature never fired on the examples it was measured on.")
        return
    top = max((max(ex["activations"], default=0.0) for ex in examples), default=1.0) or 1.0
    lines = []
    for ex in examples:
        label = plots.html_text(f"#{ex['example_id']} · {ex['label']} · max {max(ex['activations'], default=0.0):.3f}")
        spans = plots.token_spans_html(ex["tokens"], ex["activations"], max_value=top, center=ex.get("center"))
        lines.append(f'<div style="margin-bottom: 0.6rem;"><div style="color: #888; font-size: 0.75rem;">{label}</div>{spans}</div>')
    st.markdown("<div>" + "".join(lines) + "</div>", unsafe_allow_html=True)


def explorer_buttons(run, model: str, layer: int, feature: int, examples: list[dict]) -> None:
    """One button per top example: the whole text in the sentence explorer, this feature chosen."""
    if not examples:
        return
    with st.container(horizontal=True, wrap=True, vertical_alignment="center"):
        st.caption("Open in the sentence explorer:")
        for ex in examples:
            if st.button(f"#{ex['example_id']}", key=f"{keys.KEY_FB_OPEN_EXAMPLE}_{ex['example_id']}", help="the whole text, with this feature chosen", type="tertiary"):
                st.session_state[keys.KEY_TEXT] = cached.example_text(run, int(ex["example_id"]))
                st.session_state[keys.KEY_COMPARE] = False
                st.session_state[keys.KEY_EX_LAYER], st.session_state[keys.KEY_EX_MODEL] = layer, model
                st.session_state[keys.KEY_EX_LINK_FEATURE] = (model, layer, feature)
                st.switch_page("pages/explorer.py")


NO_LOGIT_EFFECT = (
    "Zero for every class: on the test texts measured, this feature does not move the logits to first order. "
    "At the last layer the classifier reads only the [CLS] token, so a feature that does not fire on [CLS] there has no effect."
)


def card_view(run, model: str, layer: int, feature: int, row: pd.Series | None) -> None:
    card = cached.feature_card(run, model, layer, feature)
    st.subheader(f"Feature {feature} · {shared.MODEL_LABELS[model]} SAE · layer {layer}")
    if row is not None:
        stats = [c for c in ("variance", "density", "selectivity", "change") if c in row.index]
        # numbers only in the tiles, two per row: four in one row cut every value to "1.…" once the
        # window is 1,024 pixels wide; the best class is a line of text below
        for pair in (stats[i : i + 2] for i in range(0, len(stats), 2)):
            for col, name in zip(st.columns(2), pair):
                col.metric(name, shared.short_number(float(row[name])), help=f"{name} = {float(row[name]):.6g}" + TILE_HELP.get(name, ""))
        if "best_class" in row.index and pd.notna(row["best_class"]):
            auc = card.get("selectivity_auroc", {}).get(row["best_class"])
            basis = f"one-vs-rest AUROC {auc:.2f}" if auc is not None else "the highest one-vs-rest AUROC"
            st.markdown(f"Fires most for **{shared.safe_text(row['best_class'])}** :gray[({basis} of its per-text maximum)]")
        elif "best_class" in row.index:
            st.markdown(f"Prefers no class :gray[(no one-vs-rest AUROC of its per-text maximum reaches {0.5 + CLASS_PREFERENCE:g})]")
        source = selectivity_source(card.get("selectivity_auroc") or {})
        if source and "selectivity" in row.index:  # three or more classes: the score may come from firing less on one
            st.markdown(f"Its selectivity ({float(row['selectivity']):.2f}) comes from firing less on **{shared.safe_text(source[0])}** :gray[(one-vs-rest AUROC {source[1]:.2f})]")
    match_box(run, model, layer, card.get("match"), card.get("match_problem"))
    st.markdown("**Top activating examples** (darker = stronger; the outlined token is the peak)")
    top_examples(card)
    explorer_buttons(run, model, layer, feature, card.get("top_examples") or [])
    # one above the other: side by side in the card's column, a 1,024 px window left each chart
    # ~150 px, its title cut and five classes' labels unreadable
    hist = card.get("histogram") or {}
    if hist.get("counts"):
        shared.chart(plots.histogram(hist["edges"], hist["counts"], title="Activation when firing", log_y=True), key="fb_hist")
    if card.get("mean_per_class"):
        shared.chart(plots.feature_bars(card["mean_per_class"], title="Mean per token, by class", x_title="class", y_title="mean activation"), key="fb_classes")
    if card.get("logit_effect"):
        shared.chart(plots.feature_bars(card["logit_effect"], title="Contribution to the class logits", x_title="class", y_title="logit contribution (drop if ablated)"), key="fb_logits")
        if not any(card["logit_effect"].values()):
            st.caption(NO_LOGIT_EFFECT)


def body() -> None:
    run = selection.current_run()
    st.title("Feature browser")
    if not shared.need_step(run, "features", "The feature browser"):
        return
    model, layer, ranking = pickers(run)
    if layer is None:  # the saes step ran (need_step above), but its folders are gone
        st.info("This run has no trained SAEs left (its `saes` folder is empty). Train them again with:")
        st.code(core_command("saes", shared.display_path(run.root), "--force"), language="bash")
        return
    table = cached.feature_table(run, model, layer, ranking)
    if table.attrs.get("matching_problem"):  # the features and their statistics are still shown
        st.warning(shared.safe_message(f"The table has no match columns: {table.attrs['matching_problem']}"), icon=":material/link_off:")
    left, right = st.columns([2, 3])
    with left:
        feature = feature_list(run, model, layer, table, ranking)
    with right:
        match = table.index[table["feature"] == feature] if "feature" in table else []
        shared.guarded(lambda: card_view(run, model, layer, feature, table.loc[match[0]] if len(match) else None))


shared.page_main(body)
