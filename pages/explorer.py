"""Sentence explorer: type a sentence (Enter) and see, per token, how similar the two models'
hidden states are at every layer, what one SAE feature does in each model, the top features of a
layer, and the fine-tuned model's prediction. A toggle puts a second sentence beside the first."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from dataclasses import dataclass

import streamlit as st

from core import plots
from core.analysis import JOINT_LABELS, SENTENCE_CHANGE_RANKING, SENTENCE_RANKING, reading_notes, reads_no_word, truncation_note
from core.errors import StatsUnreadable
from core.runfolder import OTHER_MODEL, core_command
from pages import _cached as cached
from pages import _keys as keys
from pages import _selection as selection
from pages import _shared as shared

DEFAULT_TEXT = "the acting was brilliant but the plot was dull"
DEFAULT_TEXT_B = "the acting was terrible but the plot was dull"


@dataclass
class Scales:
    """Colour-scale ends shared by the charts of compared sentences, so that one colour means one
    value in both; None: each chart fits its own data (one sentence)."""

    cosine_low: float = 0.0
    feature_max: float | None = None
    difference_bound: float | None = None
    top_max: float | None = None
    matched_max: float | None = None
    matched_bound: float | None = None


@dataclass
class SaeChoice:
    """What the SAE panels show: the dictionary (model), layer, ranking and number of features."""

    model: str
    layer: int | None
    rank_by: str
    top: int


LINK_PARAMS = ("text", "text_b", "layer", "sae", "feature", "rank", "top", "match", "stack")  # the explorer's view in its URL (``?text=...&layer=6``)
TOP_RANGE = (3, 20)  # the "Top features" slider's ends


def _number(value: str | None) -> int | None:
    """A link's whole number, or None for anything else ("abc", "-1", "3.0", a superscript "³")."""
    try:
        n = int(value or "")
    except ValueError:
        return None
    return n if n >= 0 else None


def apply_link() -> None:
    """A link to the explorer (its URL, copied from another browser) opens on the view it names:
    the sentence(s), layer, SAE dictionary and feature. Applied once per link, before the widgets
    are drawn, so what the viewer then changes wins; values that do not fit the run fall back to
    the defaults (the layer, the dictionary: pre-trained) or are dropped (a feature out of range);
    a link without a sentence keeps the sentence shown."""
    link = {k: st.query_params.get(k) for k in LINK_PARAMS}
    if not any(link.values()) or link == st.session_state.get(keys.KEY_EX_LINK):
        return
    st.session_state[keys.KEY_EX_LINK] = link
    if link["text"]:
        st.session_state[keys.KEY_TEXT] = link["text"]
        st.session_state[keys.KEY_COMPARE] = bool(link["text_b"])
    if link["text_b"]:
        st.session_state[keys.KEY_TEXT_B] = link["text_b"]
    layer = _number(link["layer"])
    if layer is not None:
        st.session_state[keys.KEY_EX_LAYER] = layer
    sae = (link["sae"] or "pretrained").lower().replace("-", "")  # "Fine-tuned" as well as "finetuned"
    if sae in shared.MODEL_LABELS:
        st.session_state[keys.KEY_EX_MODEL] = sae
    feature = _number(link["feature"])
    if layer is not None and sae in shared.MODEL_LABELS and feature is not None:
        st.session_state[keys.KEY_EX_LINK_FEATURE] = (sae, layer, feature)
    if link["rank"] in shared.EXPLORER_RANKINGS:
        st.session_state[keys.KEY_EX_RANK] = link["rank"]
    top = _number(link["top"])
    if top is not None and TOP_RANGE[0] <= top <= TOP_RANGE[1]:
        st.session_state[keys.KEY_EX_TOP] = top
    if link["match"] in ("0", "1"):
        st.session_state[keys.KEY_EX_MATCHED] = link["match"] == "1"
    if link["stack"] in ("0", "1"):
        st.session_state[keys.KEY_EX_STACK] = link["stack"] == "1"


def write_link(texts: list[str], choice: SaeChoice | None = None, feature: int | None = None, matched: bool = False, stacked: bool = False) -> None:
    """Mirror the view in the URL (see ``apply_link``), so the address bar holds a link to it: in
    one update, which the browser records as one history entry (one per parameter set separately
    made the Back button seem dead)."""
    view = dict.fromkeys(LINK_PARAMS) | {"text": texts[0] or None, "text_b": texts[1] if len(texts) > 1 else None, "stack": "1" if stacked and len(texts) > 1 else None}
    if choice is not None and choice.layer is not None:
        view.update(layer=str(choice.layer), sae=choice.model, feature=None if feature is None else str(feature), rank=choice.rank_by, top=str(choice.top), match="1" if matched else None)
    now = st.query_params.to_dict()
    wanted = {k: v for k, v in now.items() if k not in view} | {k: v for k, v in view.items() if v is not None}
    if wanted != now or any(len(st.query_params.get_all(k)) > 1 for k in now):  # also a repeated parameter (?text=a&text=b)
        st.query_params.from_dict(wanted)
    st.session_state[keys.KEY_EX_LINK] = {k: st.query_params.get(k) for k in LINK_PARAMS}  # our own link: not applied again


def sentence_inputs() -> list[str]:
    """One sentence, or two when comparing; Enter (or leaving the box) commits the text."""
    compare = bool(st.session_state.get(keys.KEY_COMPARE))
    cols = st.columns([4, 4, 2.3] if compare else [8, 1.8], vertical_alignment="bottom")  # the toggle's label whole from 1,024 px
    # defaults through the session state, not the widgets: a link (``apply_link``) or the feature
    # browser sets these keys too, and a widget given both logs Streamlit's warning on every visit
    st.session_state.setdefault(keys.KEY_TEXT, DEFAULT_TEXT)
    texts = [cols[0].text_input("Sentence (press Enter)", key=keys.KEY_TEXT, persist_state="session")]
    if compare:
        st.session_state.setdefault(keys.KEY_TEXT_B, DEFAULT_TEXT_B)
        texts.append(cols[1].text_input("Second sentence (press Enter)", key=keys.KEY_TEXT_B, persist_state="session"))
    cols[-1].toggle("Compare", key=keys.KEY_COMPARE, persist_state="session")
    return texts


def bundle_warnings(bundle) -> None:
    """One warning for what the run holds but the explorer cannot use (a damaged SAE folder, class
    names that do not fit the model): the rest of the page works without it."""
    lines = [f"{shared.MODEL_LABELS[m]} SAE, layer {layer}: {problem}" for (m, layer), problem in sorted(bundle.sae_problems.items())]
    if bundle.labels_problem:
        lines.append(f"class names: {bundle.labels_problem}; the prediction shows the fine-tuned model's own names")
    if lines:
        what = "these parts of the run, which could not be read" if len(lines) > 1 else "this part of the run, which could not be read"
        st.warning(f"The explorer leaves out {what}:\n" + "\n".join("- " + shared.safe_message(line) for line in lines), icon=":material/warning:")


def sae_controls(bundle) -> tuple[SaeChoice, list]:
    """Layer, SAE dictionary and feature ranking in one row; top-N and two empty slots, for the
    feature picker and the matched-feature toggle, in a second (six in one row cut their labels
    at a 1280 px window)."""
    layers = bundle.sae_layers
    if not layers and bundle.sae_problems:  # every SAE is damaged: the warning above names each
        return SaeChoice("pretrained", None, "variance", 5), []
    if not layers:
        command = core_command("saes", shared.display_path(bundle.run.root), "--force") if bundle.run.is_done("saes") else core_command("build", shared.display_path(bundle.run.root), "--until", "saes")
        st.info(f"This run has no SAEs, so only the per-token similarity and the prediction are shown. Train them with `{command}`.")
        return SaeChoice("pretrained", None, "variance", 5), []
    c1, c2, c3 = st.columns([1, 1.6, 1.6], vertical_alignment="bottom")
    # Every choice is kept for the session (persist_state), through an empty sentence and a visit
    # to another page; a layer kept from another run that lacks it falls back to the last one.
    if st.session_state.get(keys.KEY_EX_LAYER) not in layers:
        st.session_state[keys.KEY_EX_LAYER] = layers[-1]
    layer = c1.selectbox("Layer", layers, key=keys.KEY_EX_LAYER, help="hidden state index (0 = embeddings)", persist_state="session")
    # only the dictionaries trained at this layer (a saes step still running, or one SAE folder
    # removed, leaves a layer with one); the choice kept falls back to the first of them
    models = [m for m in shared.MODEL_LABELS if (m, layer) in bundle.saes]
    if st.session_state.get(keys.KEY_EX_MODEL) not in models:
        st.session_state[keys.KEY_EX_MODEL] = models[0]
    missing = [shared.MODEL_LABELS[m] for m in shared.MODEL_LABELS if m not in models]
    model = c2.segmented_control(
        "SAE dictionary",
        models,
        format_func=shared.MODEL_LABELS.get,
        key=keys.KEY_EX_MODEL,
        required=True,
        persist_state="session",
        help=(f"the {missing[0]} SAE at layer {layer} could not be read (see the warning above)" if bundle.sae_problems.get((OTHER_MODEL[models[0]], layer)) else f"this run has no {missing[0]} SAE at layer {layer}") if missing else None,
    ) or models[0]
    rank_by = c3.selectbox(
        "Rank features by",
        shared.EXPLORER_RANKINGS,
        format_func=lambda r: shared.RANKING_LABELS.get(r, r),
        key=keys.KEY_EX_RANK,
        persist_state="session",
        help="variance, selectivity, density, change: over the dataset (the features step; change: mean |fine-tuned − pre-trained| activation, this SAE applied to both models). Sentence variance: over this sentence's tokens, so the features that vary most along it come first (two compared sentences: over both, so both list the same features). Sentence change: |fine-tuned − pre-trained| summed over its tokens, so the features fine-tuning moved most on it come first (the panel then shows that difference)",
    )
    c4, c5, c6 = st.columns([1.6, 1, 1.6], vertical_alignment="bottom")
    top = c4.slider("Top features", *TOP_RANGE, 8, key=keys.KEY_EX_TOP, persist_state="session")
    return SaeChoice(model, layer, rank_by, top), [c5, c6]


def top_entry(result: dict, choice: SaeChoice) -> dict | None:
    """The ``saes`` entry of ``analyze_text`` for the chosen dictionary and layer."""
    for entry in result.get("saes", []):
        if entry["model"] == choice.model and int(entry["layer"]) == choice.layer:
            return entry
    return None


def top_rows(result: dict, choice: SaeChoice) -> tuple[list[dict], str]:
    """The chosen SAE's top features and which of their values the top panel shows: "difference"
    (fine-tuned - pre-trained) when they were ranked by sentence change, what that ranking measured; their
    activation on the SAE's own model otherwise."""
    entry = top_entry(result, choice)
    ranked = entry["features"] if entry else []
    return ranked, "difference" if ranked and "difference" in ranked[0] else "activations"


def ranked_together(result: dict) -> bool:
    """Whether the top features were ranked over the compared sentences together (``analyses``)."""
    return result["ranking"] in JOINT_LABELS.values()


def sentences(together: bool) -> str:
    """What a per-sentence ranking ranked over, in the page's words."""
    return "the compared sentences" if together else "this sentence"


def silent(row: dict) -> bool:
    """A top-features row whose feature does not fire on the sentence (all its values zero)."""
    return not any(row["activations"]) and not any(row.get("difference") or [])


def feature_picker(run, choice: SaeChoice, result: dict, d_sae: int) -> int | None:
    """Feature number input, defaulting to the top-ranked feature of the chosen SAE that fires on
    this sentence (the dataset's top-variance features are often silent on a short one), or the
    top-ranked one when none does; a new sentence moves it to its own default until a feature is
    picked by hand, which then stays picked for the next sentences."""
    if choice.layer is None:
        return None
    entry = top_entry(result, choice)
    ranked = [int(f["feature"]) for f in entry["features"]] if entry else []
    firing = [int(f["feature"]) for f in entry["features"] if not silent(f)] if entry else []
    default = (firing or ranked or [0])[0]
    ranking = choice.rank_by
    if ranking in (SENTENCE_RANKING, SENTENCE_CHANGE_RANKING):  # the top feature is this sentence's: each sentence starts at its own
        ranking += "_" + hashlib.sha1(result["text"].encode()).hexdigest()[:10]
    key = keys.explorer_feature_key(run, choice.model, choice.layer, ranking)
    # until a feature is picked by hand (the value is still the default last set), the picker
    # follows each new sentence to its own default
    follow = key + "_default"
    linked = st.session_state.pop(keys.KEY_EX_LINK_FEATURE, None)
    if linked and linked[:2] == (choice.model, choice.layer) and 0 <= linked[2] < d_sae:  # a link's feature: picked as if by hand
        st.session_state[key], st.session_state[follow] = linked[2], None
    if st.session_state.get(key) in (None, st.session_state.get(follow)):
        st.session_state[key] = st.session_state[follow] = default
    feature = st.number_input(
        "Feature",
        min_value=0,
        max_value=d_sae - 1,
        step=1,
        key=key,
        persist_state="session",
        help=f"feature of the {shared.MODEL_LABELS[choice.model]} SAE at layer {choice.layer}; starts at the top feature by {result['ranking']} that fires on the sentence (top: {', '.join(map(str, ranked[:10]))})",
    )
    return int(feature)


def layer_labels(num_rows: int) -> list[str]:
    return ["emb" if i == 0 else f"layer {i}" for i in range(num_rows)]


def prediction(result: dict, columns: bool = False) -> None:
    """The fine-tuned classifier's predicted class and one bar per class probability, stacked or
    (``columns``, above a full-width chart) side by side, at most five to a row.

    Plain Streamlit bars rather than a Plotly chart: Streamlit rebuilds a Plotly chart from
    scratch on every Enter, which cost 30-50 ms of the update for two to five numbers
    (``bench/dashboard.py``, interleaved runs).
    """
    pred = result["prediction"]
    if reads_no_word(result):  # nothing but [UNK]: the classifier read no word
        st.markdown(f"**Prediction: {shared.safe_text(pred['label'])}** :gray[(from unknown tokens only: not a reading of this text)]")
    else:
        st.markdown(f"**Prediction: {shared.safe_text(pred['label'])}**")
    probs = list(pred["probabilities"].items())
    split = False
    if columns and len(probs) > 1:
        per_row = min(len(probs), 5)
        slots = [c for _ in range(0, len(probs), per_row) for c in st.columns(per_row)][: len(probs)]
        # a column of a 1,024 px window holds about 70 / per_row characters ("entertainment: 0.259"
        # wrapped in one of five, pushing its bar below the others'): then every value goes on a
        # line of its own, so the bars stay level
        split = max(len(f"{label}: {p:.3f}") for label, p in probs) > 70 // per_row
    else:
        slots = [st] * len(probs)
    gap = "  \n" if split else " "  # Markdown's line break: two spaces, then a newline
    for slot, (label, p) in zip(slots, probs):
        slot.progress(min(max(float(p), 0.0), 1.0), text=f"{shared.safe_text(label)}:{gap}{p:.3f}")


def cut_after(result: dict) -> int | None:
    """Where a long text lost tokens (None when the models saw all of it)."""
    return (result.get("truncation") or {}).get("cut_after")


def cosine_panel(result: dict, key: str, low: float, wrap: int | None) -> None:
    """The cosine map alone: for a run without SAEs, or when the SAE panels fail."""
    fig = plots.token_heatmap(
        result["cosine"],
        result["tokens"],
        layer_labels(len(result["cosine"])),
        title="Cosine, pre-trained vs fine-tuned hidden state, per token",
        value_name="cosine",
        zrange=(low, 1.0),
        cut_after=cut_after(result),
        wrap=wrap,
    )
    shared.chart(fig, key=f"{key}_cosine")


def sentence_chart(run, text: str, result: dict, choice: SaeChoice, feature: int, scales: Scales, wrap: int | None):
    """Everything about one sentence in one chart, every panel on the same token columns: the
    cosine map of the two models' hidden states at every layer, the chosen feature on each
    model and their difference, and the top-N features of the same SAE. Returns the figure,
    drawn by ``sentence_panels`` (after a note when the chosen feature is silent).

    One chart rather than a cosine chart beside a feature chart: the browser rebuilds every Plotly
    chart from scratch on each Enter, and one chart instead of two took 30-50 ms off an update
    of ~300 ms (``bench/dashboard.py``, docs/bench-history.md).
    """
    acts = cached.sentence_features(run, text, choice.layer, feature, choice.model)
    ranked, shown = top_rows(result, choice)
    name = "feature " if wrap == plots.WIDE_TITLE_CHARS else "#"  # side by side, a shorter row label leaves the heatmap more width
    top = ([f"{name}{f['feature']}" + (" · silent" if silent(f) else "") for f in ranked], [f[shown] for f in ranked]) if ranked else None
    if not ranked:
        below = ""
    elif shown == "difference":
        below = f"; below: the {len(ranked)} features fine-tuning changed most on {sentences(ranked_together(result))} (fine-tuned − pre-trained)"
    else:
        below = f"; below the feature: the top {len(ranked)} features of this SAE by {result['ranking']}"
    fig = plots.feature_comparison(
        acts["tokens"],
        acts["pretrained"],
        acts["finetuned"],
        acts["difference"],
        title=f"Cosine per layer, and feature {feature} ({shared.MODEL_LABELS[choice.model]} SAE, layer {choice.layer}) on each model",
        subtitle=f"top: cosine of the pre-trained and fine-tuned hidden states per token{below}",
        top=top,
        cosine=(layer_labels(len(result["cosine"])), result["cosine"]),
        cosine_low=scales.cosine_low,
        feature_max=scales.feature_max,
        difference_bound=scales.difference_bound,
        top_max=scales.top_max,
        top_difference=shown == "difference",
        cut_after=cut_after(result),
        wrap=wrap,
    )
    if not any(acts["pretrained"]) and not any(acts["finetuned"]):  # above the chart, whose rows would otherwise look broken
        st.info(silent_hint(feature, choice.rank_by, ranked, compared=ranked_together(result)), icon=":material/visibility_off:")
    return fig


def silent_hint(feature: int, rank_by: str, ranked: list[dict], compared: bool = False) -> str:
    """What to do when the chosen feature does not fire on the sentence, worded for the ranking
    shown (the sentence rankings already list this sentence's own features)."""
    head = f"Feature {feature} does not fire on this sentence in either model"
    if rank_by in (SENTENCE_RANKING, SENTENCE_CHANGE_RANKING):
        return f"{head}: pick one of the top features below, ranked on {sentences(compared)}."
    if ranked and all(silent(f) for f in ranked):
        return f"{head}, nor do the top {len(ranked)} features by {rank_by} over the dataset: rank by sentence variance to list the features that fire here."
    return f"{head}: pick one of the top features not marked silent, or rank by sentence variance."


def matched_chart(run, text: str, result: dict, choice: SaeChoice, feature: int, scales: Scales, wrap: int | None):
    """A feature on its own model next to its matched partner (the other model's SAE) on the other model."""
    m = cached.matched_features(run, text, choice.layer, feature, choice.model)
    rows = tuple(f"{shared.MODEL_LABELS[model]} f{m[f'feature_{model}']}" if m[f"feature_{model}"] >= 0 else f"{shared.MODEL_LABELS[model]} (none)" for model in ("pretrained", "finetuned"))
    fig = plots.feature_comparison(
        m["tokens"],
        m["pretrained"],
        m["finetuned"],
        m["difference"],
        title=f"{shared.MODEL_LABELS[choice.model].capitalize()} feature {feature} and its match: {shared.match_caption(m)}",
        row_labels=rows,
        feature_max=scales.matched_max,
        difference_bound=scales.matched_bound,
        cut_after=cut_after(result),
        wrap=wrap,
    )
    return fig


def reading_captions(result: dict) -> None:
    """What the models read of the sentence: the cleaned text, what they could not read, a cut."""
    if result.get("cleaning") == "cleaned":
        st.caption(f"The models read it as the run's training texts were cleaned: “{shared.safe_text(result['text'])}”")
    for note in reading_notes(result):
        st.warning(shared.safe_text(shared.as_sentence(note)) + ".", icon=":material/translate:")
    if result.get("truncation"):
        note = truncation_note(result["truncation"])
        st.caption(f":material/content_cut: {shared.safe_text(shared.as_sentence(note))}; the dashed line marks the cut.")


def sentence_column(run, text: str, result: dict, choice: SaeChoice, feature: int | None, key: str, scales: Scales, matched: bool, wide: bool) -> None:
    """Every panel for one sentence; a failing panel shows its error and leaves the others.

    With an SAE feature: the prediction, then one full-width chart of the cosine map and the SAE
    panels (``sentence_chart``). Without SAEs: the cosine map with the prediction beside it
    (``wide``, one sentence) or below it. The notes
    on what the models read go above one sentence and below two compared ones, whose charts then
    start level whichever of them has notes.
    """
    if wide:
        reading_captions(result)
    sentence_panels(run, text, result, choice, feature, key, scales, matched, wide)
    if not wide:
        reading_captions(result)


def sentence_panels(run, text: str, result: dict, choice: SaeChoice, feature: int | None, key: str, scales: Scales, matched: bool, wide: bool) -> None:
    """The prediction and the charts of one sentence (see ``sentence_column``)."""
    wrap = plots.WIDE_TITLE_CHARS if wide else plots.NARROW_TITLE_CHARS
    low = scales.cosine_low
    if feature is None:
        first = st.columns([3, 1]) if wide else [st.container(), st.container()]
        with first[0]:
            shared.guarded(lambda: cosine_panel(result, key, low, wrap))
        with first[1]:
            shared.guarded(lambda: prediction(result))
        return
    shared.guarded(lambda: prediction(result, columns=wide))
    # built first, drawn after: the match chart's token columns are aligned with the main chart's
    figs, places = {}, {"sentence": st.container(), "matched": st.container()}
    with places["sentence"]:
        if not shared.guarded(lambda: figs.update(sentence=sentence_chart(run, text, result, choice, feature, scales, wrap))):
            shared.guarded(lambda: cosine_panel(result, key, low, wrap))  # the SAE panels failed; the cosine map needs no SAE
    if matched:
        with places["matched"]:
            shared.guarded(lambda: figs.update(matched=matched_chart(run, text, result, choice, feature, scales, wrap)))
    plots.align_token_charts(list(figs.values()))
    for name, fig in figs.items():
        with places[name]:
            shared.chart(fig, key=f"{key}_{name}")


def show_matched(features_done: bool, choice: SaeChoice) -> bool:
    """Toggle for the matched-feature panel (once the features step has matched the two dictionaries)."""
    if choice.layer is None or not features_done:
        return False
    return st.toggle("Show match", key=keys.KEY_EX_MATCHED, persist_state="session")


def open_in_browser(run, features_done: bool, choice: SaeChoice, feature: int | None) -> None:
    """A button that opens the chosen feature's card (top examples, histogram, classes, match) in
    the feature browser, once the features step has written the cards."""
    if feature is None or not features_done:
        return
    if st.button("Feature card", icon=":material/open_in_new:", key=keys.KEY_EX_OPEN_CARD, help=f"open feature {feature} of the {shared.MODEL_LABELS[choice.model]} SAE at layer {choice.layer} in the feature browser: its top examples in context, histogram, classes and match"):
        st.session_state[keys.KEY_FB_MODEL] = choice.model
        st.session_state[keys.KEY_FB_LAYER] = choice.layer
        key = keys.browser_feature_key(run, choice.model, choice.layer, st.session_state.get(keys.KEY_FB_RANK, shared.RANKINGS[0]))
        st.session_state[key] = feature
        keys.feature_typed(key)  # a fresh table, the feature's row ticked
        st.switch_page("pages/features.py")


def stack_toggle(slots: list) -> bool:
    """Two compared sentences one above the other, each chart the page's full width: side by side,
    a 1,024 px window leaves each heatmap ~70 px wide. Beside the match toggle when the SAE
    controls are shown, else on a line of its own."""
    where = slots[1] if slots else st.container()
    with where:
        return st.toggle("Stack", key=keys.KEY_EX_STACK, persist_state="session", help="compared sentences one above the other, each chart full width (for a narrow window); off: side by side")


def lowest_cosine(results: list[dict]) -> float:
    """Shared lower end of the cosine colour scale, so compared sentences read alike."""
    values = [v for r in results for row in r["cosine"] for v in row if v is not None]
    return min(0.0, min(values, default=0.0))


def _largest(rows) -> float | None:
    """Largest magnitude among lists of numbers (None-free), or None when all are 0 or there are none."""
    return max((abs(v) for row in rows for v in row), default=0.0) or None


def shared_scales(run, texts: list[str], results: list[dict], choice: SaeChoice, feature: int | None, matched: bool) -> Scales:
    """One set of colour-scale ends for every compared sentence's charts (``Scales``): the cosine's
    low end always; with two sentences, also the largest feature activation, difference and top-
    feature activation over both. Should a sentence's SAE panels fail, each chart keeps its own
    scale (the failing panel shows its error where it is drawn)."""
    scales = Scales(cosine_low=lowest_cosine(results))
    if len(texts) < 2 or feature is None:
        return scales
    try:
        acts = [cached.sentence_features(run, t, choice.layer, feature, choice.model) for t in texts]
        tops = [f[shown] for r in results for ranked, shown in [top_rows(r, choice)] for f in ranked]
        scales.feature_max = _largest([a[m] for a in acts for m in ("pretrained", "finetuned")])
        scales.difference_bound = _largest([a["difference"] for a in acts])
        scales.top_max = _largest(tops)
        if matched:
            pairs = [cached.matched_features(run, t, choice.layer, feature, choice.model) for t in texts]
            scales.matched_max = _largest([p[m] for p in pairs for m in ("pretrained", "finetuned")])
            scales.matched_bound = _largest([p["difference"] for p in pairs])
    except Exception:  # noqa: BLE001 - shown by the panel that fails, with its message
        return Scales(cosine_low=scales.cosine_low)
    return scales


def analyses(run, texts: list[str], choice: SaeChoice, sae: tuple[str, int] | None) -> list[dict]:
    """Each sentence's analysis. Compared sentences under a per-sentence ranking are ranked on
    their tokens together, so their charts list the same features in the same order."""
    together = tuple(texts) if len(texts) > 1 and choice.rank_by in (SENTENCE_RANKING, SENTENCE_CHANGE_RANKING) else ()
    return [cached.analysis(run, t, choice.top, choice.rank_by, sae, together) for t in texts]


def body() -> None:
    run = selection.current_run()
    st.title("Sentence explorer")
    if not shared.need_step(run, "finetune", "The sentence explorer"):
        return
    apply_link()
    texts = [t for t in sentence_inputs()]
    if not all(t.strip() for t in texts):
        st.info("Type a sentence and press Enter.")
        write_link([""])  # no sentence in the link either
        return
    bundle = cached.bundle(run)
    bundle_warnings(bundle)
    choice, slots = sae_controls(bundle)
    sae = (choice.model, choice.layer) if choice.layer is not None else None
    try:
        results = analyses(run, texts, choice, sae)
    except StatsUnreadable as e:  # the dataset-level ranking cannot be read: this sentence's, saying why
        st.warning(shared.safe_message(f"{e}. Until then the features are ranked by their variance over {sentences(len(texts) > 1)}."))
        choice = dataclasses.replace(choice, rank_by=SENTENCE_RANKING)
        results = analyses(run, texts, choice, sae)
    feature, matched = None, False
    if slots:
        with slots[0]:
            feature = feature_picker(run, choice, results[0], bundle.saes[sae].cfg.d_sae)
        with slots[1], st.container(horizontal=True, vertical_alignment="center", wrap=True):
            features_done = run.is_done("features")  # one manifest read for both controls
            matched = show_matched(features_done, choice)
            open_in_browser(run, features_done, choice, feature)
    stacked = len(texts) > 1 and stack_toggle(slots)
    if matched and len(texts) > 1 and not shared.guarded(lambda: cached.matched_features(run, texts[0], choice.layer, feature, choice.model)):
        matched = False  # no usable matching for this layer: its message once, above both sentences
    write_link(texts, choice, feature, matched, stacked)
    scales = shared_scales(run, texts, results, choice, feature, matched)
    cols = [st.container() for _ in texts] if stacked else st.columns(len(texts))
    for i, (col, text, result) in enumerate(zip(cols, texts, results)):
        with col:
            if stacked:
                st.subheader(shared.safe_text(textwrap.shorten(text, width=90, placeholder=" …")), divider="gray", anchor=False)
            elif len(texts) > 1:  # one line each, even in a 1,024 px window, so the two charts start level (the boxes above hold the whole text)
                st.text(textwrap.shorten(text, width=32, placeholder=" …"))
            sentence_column(run, text, result, choice, feature, "ab"[i], scales, matched, wide=len(texts) == 1 or stacked)


shared.page_main(body)
