"""Figures for the dashboard and the HTML export: plain data in, ``plotly.graph_objects.Figure`` out.

Nothing here imports streamlit. Plotly renders tick labels, legend entries, titles and hover
text as a small HTML subset, so every label that comes from user data (tokens, class names,
run names) goes through ``esc`` first: ``<b>x</b>`` shows as literal text, never as markup.
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import get_colorscale, qualitative, sample_colorscale

from core.runfolder import MODEL_NAMES

MEASURES = ("cosine_of_means", "mean_cosine", "token_cosine", "cka")
MEASURE_LABELS = {
    "cosine_of_means": "cosine of means",
    "mean_cosine": "mean cosine",
    "token_cosine": "token cosine",
    "cka": "linear CKA",
}
MEASURE_COLOURS = {"cosine_of_means": "#636EFA", "mean_cosine": "#EF553B", "token_cosine": "#00CC96", "cka": "#AB63FA"}
RUN_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
CLASS_METRICS = (("precision", "precision"), ("recall", "recall"), ("f1-score", "F1"))
METRIC_COLOURS = {"precision": "#0068C9", "recall": "#83C9FF", "f1-score": "#FF2B2B"}  # fixed, so the dashboard and the HTML report agree
LAYER_AXIS = "hidden state (0 = embeddings)"
DEPTH_AXIS = "relative depth (layer / number of layers)"


def esc(text) -> str:
    """Escape ``<``, ``>`` and ``&`` so Plotly shows user text literally."""
    return html.escape(str(text), quote=False)


TITLE_LINE_PX, SUBTITLE_LINE_PX = 22, 16  # height of one more wrapped line of a title / subtitle
NARROW_TITLE_CHARS = 38  # title characters per line that fit a chart half a page wide (two sentences side by side)
WIDE_TITLE_CHARS = 80  # and a chart the page's width, both in a window 1,024 pixels wide


def _wrapped_title(title: str, subtitle: str = "", wrap: int | None = None) -> tuple[dict | None, int]:
    """Plotly title (escaped) and the extra top margin it needs. ``wrap``: at most that many
    characters per title line (a subtitle's smaller font fits 1.3x as many), for charts too narrow
    for the whole title on one line, such as two sentences side by side; Plotly never wraps
    titles itself and cuts them at the chart's edge."""
    if not title:
        return None, 0

    def lines(text: str, width: int | None) -> list[str]:
        return [esc(t) for t in (textwrap.wrap(text, width, break_on_hyphens=False) if width else [text])] or [""]

    head = lines(title, wrap)
    sub = lines(subtitle, int(wrap * 1.3) if wrap else None) if subtitle else []
    spec = {"text": "<br>".join(head)}
    if sub:
        spec["subtitle"] = {"text": "<br>".join(sub)}
    if len(head) > 1 or len(sub) > 1:  # pinned to the top, so the added lines grow downwards into the margin
        spec.update(y=1, yref="container", yanchor="top", pad={"t": 12})
    return spec, TITLE_LINE_PX * (len(head) - 1) + SUBTITLE_LINE_PX * max(len(sub) - 1, 0)


def _layout(fig: go.Figure, title: str = "", height: int | None = None) -> go.Figure:
    fig.update_layout(
        title={"text": title} if title else None,
        margin={"l": 10, "r": 10, "t": 80 if title else 40, "b": 10},
        height=height,
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "left", "x": 0},
    )
    return fig


def _token_axis_margins(tokens: Sequence[str], rows: Sequence[str], top: int) -> dict:
    """Margins sized from the longest labels instead of measured by the browser.

    Plotly's default template turns ``automargin`` on, so the browser measures every tick label's
    box on each redraw; with 64 rotated token labels per chart that was the largest part of the
    sentence explorer's update time (``bench/dashboard.py``). At Plotly's 12 px font a character
    is at most ~7 px wide; a label rotated by -45 degrees reaches ~0.71 of its width down (and,
    for the first token, left): 6 px per character leaves room to spare.
    """

    def chars(labels: Sequence[str]) -> int:
        return max((len(html.unescape(str(t))) for t in labels), default=1)

    down = 16 + int(6 * chars(tokens))
    left = 14 + max(int(7 * chars(rows)), int(5 * len(html.unescape(str(tokens[0])))) if tokens else 0)
    return {"l": left, "r": 10, "t": top, "b": down}


# Token axes: fixed margins (above) and ``ticklabeloverflow="allow"``. On a linear axis Plotly
# defaults that setting to "hide past div", and the plotly.js bundled with Streamlit then re-checks
# every label's box after placing each one: O(tokens^2) layout reads, which made the sentence
# explorer's update with 64 tokens ~40% slower.
_TOKEN_AXIS = {"automargin": False, "ticklabeloverflow": "allow", "showgrid": False}
# Scales spelled out: unvalidated figures would pass the bare name to plotly.js, whose "RdBu" is
# another scale (blue to grey to red) than plotly.py's ColorBrewer one (red to white to blue).
_VIRIDIS = [[round(stop, 6), colour] for stop, colour in get_colorscale("Viridis")]
_RDBU = [[round(stop, 6), colour] for stop, colour in get_colorscale("RdBu")]


def _array_ticks(labels: Sequence[str], **extra) -> dict:
    return {"tickmode": "array", "tickvals": list(range(len(labels))), "ticktext": list(labels), **_TOKEN_AXIS, **extra}


HOVER_HINT_TOKENS = 24  # beyond this many tokens a narrow chart labels only some of them: the axis says to hover
BAR_GAP = 14  # px between stacked colour bars: room for a 12 px tick label at each bar's end
DIFFERENCE_LINES = ("fine-tuned −", "pre-trained")  # the difference row's label, one line each


def _token_ticks(labels: Sequence[str]) -> dict:
    """The token axis: a category axis over the token positions 0..T-1, each position shown as its
    token (``labelalias``; a repeated token keeps its own column).

    Plotly labels a category axis at every n-th category with n chosen from the width it draws
    (a label per ~14 px at the 12 px font), so every token is labelled in a wide chart and every
    n-th one in a narrow chart, a 1,024 px window or two sentences side by side, instead of a
    fixed number of labels piling up where the chart is narrow: the server cannot know the
    width. Hover names every token.
    """
    ticks = {"type": "category", "labelalias": {str(i): t for i, t in enumerate(labels)}, "tickangle": -45, **_TOKEN_AXIS}
    if len(labels) > HOVER_HINT_TOKENS:
        ticks["title"] = {"text": "hover for every token", "font": {"size": 11}}
    return ticks


def _token_margins(rows: Sequence[str], top: int, xaxis: dict) -> dict:
    """``_token_axis_margins`` for the tokens ``xaxis`` labels, plus room for its title, if any."""
    margin = _token_axis_margins(list(xaxis["labelalias"].values()), rows, top)
    if "title" in xaxis:
        margin["b"] += 24
    return margin


def _cut_marker(cut_after: int | None) -> dict:
    """Layout ``shapes`` / ``annotations`` marking where a long text's middle (or end) was left out:
    a dashed line between token ``cut_after`` and the next, across every panel."""
    if cut_after is None:
        return {}
    x = cut_after + 0.5
    return {
        "shapes": [{"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1, "line": {"color": "#FF4B4B", "width": 2, "dash": "dash"}}],
        "annotations": [{"xref": "x", "yref": "paper", "x": x, "y": 1, "yanchor": "bottom", "text": "text cut here", "showarrow": False, "font": {"size": 11, "color": "#FF4B4B"}}],
    }


def _spec_figure(data: list[dict], layout: dict) -> go.Figure:
    """A Figure from plain trace and layout dicts, without plotly.py's per-property validation.

    Built through ``graph_objects`` setters, the sentence explorer's three token charts took
    ~40 ms of Python per update (more than both forward passes); from dicts they take ~2 ms.
    The specs are fixed by this module, and ``tests/test_plots.py`` re-validates every builder's
    output with ``go.Figure(fig.to_dict())``.
    """
    if not layout.get("title"):
        layout.pop("title", None)
    return go.Figure({"data": data, "layout": layout}, _validate=False)


# ----------------------------------------------------------------------------- layer similarity
def layer_positions(rows: Sequence[Mapping], normalise_depth: bool) -> list[float]:
    """x positions of similarity rows: the hidden-state index, or index / number of layers."""
    layers = [int(r["layer"]) for r in rows]
    num_layers = max(max(layers, default=0), 1)
    return [l / num_layers for l in layers] if normalise_depth else layers


def _similarity_range(runs: Mapping[str, Sequence[Mapping]], measures: Sequence[str]) -> list[float]:
    """y range of the similarity figures: up to 1, down to 0 or the lowest value shown when negative."""
    values = [float(row[m]) for rows in runs.values() for row in rows for m in measures if row.get(m) is not None]
    return [min(0.0, min(values, default=0.0)) - 0.02, 1.02]


def similarity_curves(
    runs: Mapping[str, Sequence[Mapping]],
    measures: Sequence[str] = MEASURES,
    normalise_depth: bool = False,
    title: str = "",
) -> go.Figure:
    """One line per (run, measure) over layers; colour = measure, dash = run.

    ``runs`` maps a run name to its similarity rows (``report["similarity"]``: dicts with
    ``layer`` and one value per measure).
    """
    fig = go.Figure()
    many = len(runs) > 1
    for r, (name, rows) in enumerate(runs.items()):
        x = layer_positions(rows, normalise_depth)
        for m in measures:
            label = f"{esc(name)} · {MEASURE_LABELS.get(m, esc(m))}" if many else MEASURE_LABELS.get(m, esc(m))
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[row.get(m) for row in rows],
                    mode="lines+markers",
                    name=label,
                    line={"color": MEASURE_COLOURS.get(m), "dash": RUN_DASHES[r % len(RUN_DASHES)]},
                    customdata=[[int(row["layer"])] for row in rows],
                    hovertemplate=f"{label}<br>layer %{{customdata[0]}}<br>%{{y:.4f}}<extra></extra>",
                )
            )
    fig.update_xaxes(title=DEPTH_AXIS if normalise_depth else LAYER_AXIS, dtick=None if normalise_depth else 1)
    fig.update_yaxes(title="similarity, pre-trained vs fine-tuned", range=_similarity_range(runs, measures))
    fig.update_layout(showlegend=True)  # Plotly hides the legend of a single line, which then goes unnamed
    return _layout(fig, esc(title))


RUN_COLOURS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880")


def similarity_by_measure(
    runs: Mapping[str, Sequence[Mapping]],
    measures: Sequence[str] = ("cosine_of_means", "cka"),
    normalise_depth: bool = False,
    title: str = "",
) -> go.Figure:
    """One panel per measure (two per row), one line per run (colour = run; ``meta`` = the
    measure): runs side by side, as the paper's Figs 1-2 put its datasets. ``runs`` as for
    ``similarity_curves``."""
    from plotly.subplots import make_subplots

    cols = min(2, max(len(measures), 1))
    nrows = -(-max(len(measures), 1) // cols)
    # each panel names its measure on its y axis: subplot titles sit where the legend goes
    fig = make_subplots(rows=nrows, cols=cols, horizontal_spacing=0.1, vertical_spacing=0.12 if nrows > 1 else 0.1)
    for r, (name, rows) in enumerate(runs.items()):
        x = layer_positions(rows, normalise_depth)
        for i, m in enumerate(measures):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[row.get(m) for row in rows],
                    mode="lines+markers",
                    name=esc(name),
                    legendgroup=esc(name),
                    showlegend=i == 0,
                    meta=m,
                    line={"color": RUN_COLOURS[r % len(RUN_COLOURS)]},
                    customdata=[[int(row["layer"])] for row in rows],
                    hovertemplate=f"{esc(name)} · {MEASURE_LABELS.get(m, esc(m))}<br>layer %{{customdata[0]}}<br>%{{y:.4f}}<extra></extra>",
                ),
                row=i // cols + 1,
                col=i % cols + 1,
            )
    fig.update_xaxes(dtick=None if normalise_depth else 1)
    fig.update_xaxes(title=DEPTH_AXIS if normalise_depth else LAYER_AXIS, row=nrows)
    for i in range(len(measures), nrows * cols):  # an odd number of measures leaves the last cell empty: no bare axes there
        fig.update_xaxes(visible=False, row=i // cols + 1, col=i % cols + 1)
        fig.update_yaxes(visible=False, row=i // cols + 1, col=i % cols + 1)
        if nrows > 1:  # the layer axis title goes on the panel above it, the last of its column
            fig.update_xaxes(title=DEPTH_AXIS if normalise_depth else LAYER_AXIS, row=nrows - 1, col=i % cols + 1)
    fig.update_yaxes(range=_similarity_range(runs, measures))  # one scale in every panel
    for i, m in enumerate(measures):
        fig.update_yaxes(title=MEASURE_LABELS.get(m, esc(m)), row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(showlegend=True)
    return _layout(fig, esc(title), height=380 * nrows + 60)


def highlight_layers(fig: go.Figure, layers: Sequence[int], label: str = "", colour: str = "#FFA15A") -> go.Figure:
    """Shade the span of ``layers`` (hidden-state indices) on a non-normalised layer axis; its
    label goes to the end of the span away from the curves there (the bottom where they run high,
    as early layers do, the top where they run low), so it does not sit on a line."""
    if len(layers):
        x0, x1 = min(layers) - 0.4, max(layers) + 0.4
        inside = [y for t in fig.data for x, y in zip(t.x or (), t.y or ()) if y is not None and x0 <= x <= x1]
        every = [y for t in fig.data for y in (t.y or ()) if y is not None]
        lo, hi = fig.layout.yaxis.range or (min(every, default=0.0), max(every, default=1.0))
        high = bool(inside) and sum(inside) / len(inside) > (lo + hi) / 2
        fig.add_vrect(
            x0=x0,
            x1=x1,
            fillcolor=colour,
            opacity=0.18,
            line_width=0,
            annotation_text=esc(label),
            annotation_position="bottom left" if high else "top left",
        )
    return fig


CLAIM_COLOURS = {"early": "#00CC96", "middle": "#FFA15A", "late": "#EF553B"}  # the paper's three layer groups
CLAIM_MEASURES = ("cka", "mean_cosine")  # what core.export checks the paper's claims on


def claim_figure(runs: Mapping[str, Sequence[Mapping]], groups: Mapping[str, Sequence[int]], threshold: float | None = None, title: str = "") -> go.Figure:
    """CKA and mean cosine per layer (the measures the paper's claims are checked on) with each of
    ``groups`` ("early" / "middle" / "late" -> hidden-state indices) shaded, and, given a
    ``threshold``, the line that claim 1 holds the early layers to."""
    fig = similarity_curves(runs, CLAIM_MEASURES, title=title)
    for name, layers in groups.items():
        highlight_layers(fig, layers, name, CLAIM_COLOURS[name])
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dot", line_color="#888", annotation_text=f"high = {threshold:g}", annotation_position="bottom right")
    return fig


def cka_heatmap(matrix: Sequence[Sequence[float]], title: str = "Linear CKA, every layer pair") -> go.Figure:
    """``matrix[i][j]`` = CKA(pre-trained layer i, fine-tuned layer j): pre-trained on y, fine-tuned on x."""
    z = np.asarray(matrix, dtype=float)
    n_pre, n_ft = z.shape if z.ndim == 2 else (0, 0)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_ft)),
            y=list(range(n_pre)),
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            # below the square, as wide as the chart: a bar beside it took a third of a half-width
            # chart (1,024 px window), and the square shrank to ~130 px under a bar three times its height
            colorbar={"title": {"text": "CKA", "side": "right"}, "orientation": "h", "y": -0.28, "yanchor": "top", "len": 1, "thickness": 12},
            hovertemplate="pre-trained layer %{y}<br>fine-tuned layer %{x}<br>CKA %{z:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="fine-tuned hidden state", dtick=1, constrain="domain")
    fig.update_yaxes(title="pre-trained hidden state", dtick=1, autorange="reversed", scaleanchor="x", constrain="domain")  # a narrow chart shrinks the square, never pads its range
    fig = _layout(fig, esc(title))
    fig.update_layout(margin={"b": 90})  # room for the colour bar below the axis title
    return fig


# ----------------------------------------------------------------------------- classification
# Bar value labels too small to read are left out (hover gives every value): plotly.js shrinks a
# label to fit its bar, and five classes in a half-width chart at 1,024 px drew them 4-5 px tall.
READABLE_BAR_TEXT = {"minsize": 9, "mode": "hide"}


def classification_bars(per_class: Mapping[str, Mapping[str, float]], title: str = "") -> go.Figure:
    """Grouped bars of precision, recall and F1 per class (a sklearn classification report dict)."""
    classes = [c for c in per_class if c not in ("accuracy", "macro avg", "weighted avg")]
    names = [esc(c) for c in classes]
    upright = len(classes) > 3  # three bars per class: beyond three classes, level labels overlap on a half-width chart
    fig = go.Figure()
    for key, label in CLASS_METRICS:
        values = [per_class[c].get(key) for c in classes]
        fig.add_trace(
            go.Bar(
                x=names,
                y=values,
                name=label,
                text=[f"{v:.2f}" if v is not None else "" for v in values],
                textposition="outside",
                textangle=-90 if upright else 0,
                marker_color=METRIC_COLOURS[key],
                hovertemplate=f"%{{x}}<br>{label} %{{y:.4f}}<extra></extra>",
            )
        )
    fig.update_layout(barmode="group", uniformtext=READABLE_BAR_TEXT)
    fig.update_yaxes(range=[0, 1.2 if upright else 1.1], title="score")
    fig.update_xaxes(title="class", type="category")
    fig = _layout(fig, esc(title))
    if title:  # pinned to the top, with room below it for a legend that wraps onto two or three rows in a half-width chart
        fig.update_layout(title={"y": 1, "yref": "container", "yanchor": "top", "pad": {"t": 12}}, margin={"t": 110})
    return fig


# ----------------------------------------------------------------------------- tokens
def _token_trace(z, tokens: Sequence[str], rows: Sequence[str], value_name: str) -> dict:
    """A ``[rows][tokens]`` heatmap trace on index positions (a repeated token keeps its own
    column), hovering token, row and value. ``tokens``, ``rows`` and ``value_name`` come escaped."""
    return {
        "type": "heatmap",
        "z": z,
        "x": list(range(len(tokens))),
        "y": list(range(len(rows))),
        "customdata": [[[tok, row] for tok in tokens] for row in rows],
        "hovertemplate": f"token %{{customdata[0]}}<br>%{{customdata[1]}}<br>{value_name} %{{z:.4f}}<extra></extra>",
    }


def token_heatmap(
    z: Sequence[Sequence[float]],
    x_labels: Sequence[str],
    y_labels: Sequence,
    title: str = "",
    diverging: bool = False,
    value_name: str = "value",
    zrange: tuple[float, float] | None = None,
    cut_after: int | None = None,
    wrap: int | None = None,
) -> go.Figure:
    """Rows x tokens heatmap; x positions are indices so repeated tokens stay separate columns.

    Hover shows the token, the row label and the exact value. ``diverging=True`` centres a
    red-blue scale at zero (for signed values such as differences). ``cut_after`` marks where a
    truncated text lost tokens (``analyze_text``'s ``truncation``); as many tokens are labelled
    as the drawn width fits (``_token_ticks``); ``wrap`` breaks a long title into lines (``_wrapped_title``).
    """
    values = np.asarray(z, dtype=float)
    if values.ndim == 1:
        values = values[None, :]
    tokens = [esc(t) for t in x_labels]
    rows = [esc(r) for r in y_labels]
    trace = {**_token_trace(values, tokens, rows, esc(value_name)), "colorbar": {"title": {"text": esc(value_name)}}}
    if diverging:
        bound = float(np.nanmax(np.abs(values))) if values.size and np.isfinite(values).any() else 1.0
        trace.update(colorscale=_RDBU, zmid=0)
        if bound > 0:
            trace.update(zmin=-bound, zmax=bound)
    else:
        trace["colorscale"] = _VIRIDIS
        if zrange is not None:
            trace.update(zmin=zrange[0], zmax=zrange[1])
    xaxis = _token_ticks(tokens)
    head, extra = _wrapped_title(title, wrap=wrap)
    layout = {
        "title": head,
        "height": max(180, 60 + 28 * len(rows)) + 40 + extra,
        "margin": _token_margins(rows, (80 if title else 40) + extra, xaxis),
        "xaxis": xaxis,
        "yaxis": _array_ticks(rows, autorange="reversed"),
        **_cut_marker(cut_after),
    }
    return _spec_figure([trace], layout)


def _stacked_domains(rows: Sequence[int], gap: float = 0.06) -> list[list[float]]:
    """Vertical paper domains, top panel first, each as tall as its share of heatmap rows."""
    free = 1.0 - gap * (len(rows) - 1)
    out, top = [], 1.0
    for n in rows:
        height = free * n / sum(rows)
        out.append([round(max(0.0, top - height), 4), round(top, 4)])
        top -= height + gap
    return out


class _Panel(NamedTuple):
    """One heatmap panel of ``feature_comparison``."""

    name: str  # trace name: "cosine", "feature", "difference" or "top features"
    rows: Sequence[str]  # row labels, top to bottom
    z: np.ndarray  # [rows, tokens]
    value_name: str  # what a cell holds, in the hover text and on the colour bar
    low: float  # the colour scale's ends
    high: float
    colours: dict  # the trace's colour keys (colorscale, zmin, zmax, zmid)


def _comparison_panels(pre, ft, diff, n_tokens: int, row_labels, top, cosine, cosine_low, feature_max, difference_bound, top_max, top_difference) -> list[_Panel]:
    """``feature_comparison``'s panels, top to bottom, with their colour scales (see there)."""
    hi = feature_max or float(np.nanmax([pre.max(initial=0.0), ft.max(initial=0.0)])) or 1.0
    bound = difference_bound or float(np.nanmax(np.abs(diff), initial=0.0)) or 1.0
    top_values = np.asarray(top[1], dtype=float).reshape(len(top[0]), n_tokens) if top is not None and len(top[0]) else None
    if top_values is not None and not top_difference:  # the feature is often among the top ones: one colour, one activation
        hi = max(hi, top_max or float(np.nanmax(top_values, initial=0.0)))
    # a difference is drawn no stronger than the activations it is the difference of: scaled to its
    # own largest magnitude, a change of 0.8 looked as saturated as one of 5
    bound = max(bound, hi)
    if top_values is not None and top_difference:  # the same quantity as the difference row: one scale
        bound = max(bound, top_max or float(np.nanmax(np.abs(top_values), initial=0.0)))

    def sequential(low: float, high: float) -> dict:
        return {"colorscale": _VIRIDIS, "zmin": low, "zmax": high}

    def diverging(b: float) -> dict:
        return {"colorscale": _RDBU, "zmid": 0, "zmin": -b, "zmax": b}

    panels = []
    if cosine is not None:
        values = np.asarray(cosine[1], dtype=float).reshape(len(cosine[0]), n_tokens)
        panels.append(_Panel("cosine", cosine[0], values, "cosine", cosine_low, 1.0, sequential(cosine_low, 1.0)))
    panels.append(_Panel("feature", row_labels, np.stack([pre, ft]), "activation", 0.0, hi, sequential(0, hi)))
    panels.append(_Panel("difference", ["fine-tuned − pre-trained"], diff[None, :], "difference", -bound, bound, diverging(bound)))
    if top_values is not None:
        if top_difference:
            panels.append(_Panel("top features", top[0], top_values, "difference", -bound, bound, diverging(bound)))
        else:  # the feature rows' scale (plotly.js keeps a zmin only beside a zmax)
            panels.append(_Panel("top features", top[0], top_values, "activation", 0.0, hi, sequential(0, hi)))
    return panels


BAR_ROOM = 100  # px right of the heatmaps of token charts drawn one above the other: their colour bars, tick labels and titles (57-95 px measured)


def align_token_charts(figs: Sequence[go.Figure]) -> None:
    """Make token charts drawn one above the other (the explorer's chart and its match chart)
    share their plot area's edges, so their token columns line up: each takes the widest left
    margin (row labels) of them all, and ``BAR_ROOM`` on the right. Left alone, each sized its
    own margins: the match chart's columns started ~35 px left of the main chart's and ended
    ~26 px right of them (the browser grows the right margin to each chart's colour bars)."""
    if len(figs) < 2:
        return
    left = max(f.layout.margin.l for f in figs)
    for f in figs:
        f.layout.margin.l, f.layout.margin.r = left, max(f.layout.margin.r, BAR_ROOM)


def _colour_bar(domain: Sequence[float], plot_px: float, name: str, low: float, high: float | None) -> dict:
    """A colour bar beside the panel at ``domain`` (paper fraction of ``plot_px``), in pixels,
    BAR_GAP short of the panel so the end labels of stacked bars never touch. Titled at its side
    only when the title fits along the bar (a panel's row labels already say what it shows); a
    short bar is labelled at its two ends."""
    lo, up = domain
    px = max((up - lo) * plot_px - BAR_GAP, 16)
    spec = {"y": (lo + up) / 2, "len": px, "lenmode": "pixels", "ypad": 0, "thickness": 12}
    if px >= 7 * len(name) + 16:
        spec["title"] = {"text": name, "side": "right"}
    if px < 60 and high is not None:
        number = "{:+.2g}" if name == "difference" else "{:.2g}"
        spec.update(tickmode="array", tickvals=[low, high], ticktext=[number.format(low), number.format(high)])
    return spec


def feature_comparison(
    tokens: Sequence[str],
    pretrained: Sequence[float],
    finetuned: Sequence[float],
    difference: Sequence[float] | None = None,
    title: str = "",
    row_labels: tuple[str, str] = ("pre-trained", "fine-tuned"),
    top: tuple[Sequence[str], Sequence[Sequence[float]]] | None = None,
    subtitle: str = "",
    cut_after: int | None = None,
    cosine: tuple[Sequence[str], Sequence[Sequence[float]]] | None = None,
    cosine_low: float = 0.0,
    feature_max: float | None = None,
    difference_bound: float | None = None,
    top_max: float | None = None,
    wrap: int | None = None,
    top_difference: bool = False,
) -> go.Figure:
    """One feature per token on both models (sequential scale) above their difference (red-blue,
    centred at zero), on a shared token axis so the columns line up.

    ``top = (row labels, [rows][tokens] activations)`` adds a panel below (the explorer's top
    features of the same SAE); ``cosine = (row labels, [layers][tokens] cosines)`` adds one above
    (the two models' hidden states compared per token, on a viridis scale from ``cosine_low`` to
    1; ``None`` values show as gaps). Everything on one token axis in one chart: the browser
    rebuilds each Plotly chart from scratch when its data changes, so one chart per sentence
    instead of two or three is the cheapest update (``bench/dashboard.py``). The labelled token
    axis is always ``xaxis``, at the bottom; the panels above follow it. Traces are named
    ("cosine", "feature", "difference", "top features") and ordered top to bottom.
    ``cut_after`` and ``wrap`` as in ``token_heatmap``.

    The feature rows and the top features (activations of the same SAE's latents) share one
    colour scale, from 0 to the largest activation of either, and the difference runs from -b to
    +b with b the larger of its largest magnitude and that activation scale's top, so a small
    change looks small; ``feature_max``, ``top_max`` and ``difference_bound`` set those ends
    instead, so that charts drawn side by side (two sentences compared) give one colour one value.
    ``top_difference``: the top panel holds differences (fine-tuned - pre-trained, the features
    ranked by sentence change), drawn on the difference row's red-blue scale, which then also
    covers ``top_max`` (or their largest magnitude).
    """
    pre, ft = np.asarray(pretrained, dtype=float), np.asarray(finetuned, dtype=float)
    diff = ft - pre if difference is None else np.asarray(difference, dtype=float)
    labels = [esc(t) for t in tokens]
    panels = _comparison_panels(pre, ft, diff, len(labels), row_labels, top, cosine, cosine_low, feature_max, difference_bound, top_max, top_difference)
    sizes = [len(p.rows) for p in panels]
    domains = _stacked_domains(sizes)
    # axis n (1-based, top panel first): the last one is "x"/"y" and carries the token labels
    names = [f"{i + 2}" for i in range(len(panels) - 1)] + [""]
    xaxis = _token_ticks(labels)
    # the difference row says which way round it is, on two lines so it is no wider than the rows
    # above; its colour bar's ends carry signs (blue: higher on the fine-tuned model)
    y_rows = [[esc(r) for r in p.rows] if p.name != "difference" else ["<br>".join(DIFFERENCE_LINES)] for p in panels]
    head, extra = _wrapped_title(title, subtitle, wrap)
    margin = _token_margins([line for rows in y_rows for r in rows for line in r.split("<br>")], (80 if title else 40) + extra, xaxis)
    plot_px = 20 + 30 * sum(sizes)  # the panels' own height, whatever the margins take
    height = margin["t"] + margin["b"] + plot_px
    traces = [
        {
            "type": "heatmap",
            "name": p.name,
            "xaxis": f"x{axis}",
            "yaxis": f"y{axis}",
            **_token_trace(p.z, labels, [esc(r) for r in p.rows], p.value_name),
            **p.colours,
            "colorbar": _colour_bar(domain, plot_px, p.value_name, p.low, p.high),
        }
        for p, axis, domain in zip(panels, names, domains)
    ]
    layout = {
        "title": head,
        "height": height,
        "margin": margin,
        **_cut_marker(cut_after),
    }
    for name, domain, ticks in zip(names, domains, y_rows):
        labelled = name == ""
        layout[f"xaxis{name}"] = {"anchor": f"y{name}", "domain": [0.0, 1.0], **(xaxis if labelled else {"type": "category", "matches": "x", "showticklabels": False, "ticks": "", **_TOKEN_AXIS})}
        layout[f"yaxis{name}"] = {"anchor": f"x{name}", "domain": domain, **_array_ticks(ticks, autorange="reversed")}
    return _spec_figure(traces, layout)


# ----------------------------------------------------------------------------- SAEs
MATCH_PARTS = (("kept", "kept", "#00CC96"), ("shifted", "shifted", "#FFA15A"), ("lost", "lost (no similar partner)", "#EF553B"))
MATCH_PAIRS = (("", "fine-tuned"), ("baseline_", "seed twin"))  # what the pre-trained SAE is matched with


def sae_training_curves(saes: Sequence[Mapping], title: str = "") -> go.Figure:
    """Training MSE per logging window for each SAE of ``saes`` (``report["saes"]`` entries with a
    ``loss_curve``), one panel per model, one line per layer (darker = deeper), and each SAE's
    held-out FVU as a diamond at its last step.

    Inputs are scaled to unit variance per element before training, so the training MSE reads as
    the FVU of the training batches: the gap to the diamond is the train/test gap, and a curve
    still falling at its last step says the SAE was short of steps.
    """
    from plotly.subplots import make_subplots

    models = [m for m in MODEL_NAMES if any(s.get("model") == m and s.get("loss_curve") for s in saes)]
    fig = make_subplots(rows=1, cols=max(len(models), 1), shared_yaxes=True, horizontal_spacing=0.04, subplot_titles=[MODEL_NAMES[m] + " SAEs" for m in models] or None)
    layers = sorted({int(s["layer"]) for s in saes if s.get("loss_curve")})
    colour_of = _layer_colours(layers)
    for col, model in enumerate(models, start=1):
        for s in sorted((s for s in saes if s.get("model") == model and s.get("loss_curve")), key=lambda s: int(s["layer"])):
            layer = int(s["layer"])
            colour = colour_of[layer]
            curve = s["loss_curve"]
            name = f"layer {layer}"
            fig.add_trace(
                go.Scatter(
                    x=curve["step"],
                    y=curve["mse"],
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": colour},
                    hovertemplate=f"{MODEL_NAMES[model]} SAE, {name}<br>step %{{x}}<br>training MSE %{{y:.4f}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
            if s.get("fvu") is not None and curve["step"]:
                fig.add_trace(
                    go.Scatter(
                        x=[curve["step"][-1]],
                        y=[s["fvu"]],
                        mode="markers",
                        name=f"{name}, held-out FVU",
                        legendgroup=name,
                        showlegend=False,
                        marker={"color": colour, "symbol": "diamond", "size": 9, "line": {"width": 1, "color": "white"}},
                        hovertemplate=f"{MODEL_NAMES[model]} SAE, {name}<br>held-out FVU %{{y:.4f}}<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
        fig.update_xaxes(title="step", row=1, col=col)
    fig.update_yaxes(title="training MSE / variance (◆ held-out FVU)", rangemode="tozero", row=1, col=1)
    fig = _layout(fig, esc(title))
    fig.update_layout(legend={"y": 1.08}, margin={"t": 110 if title else 70})
    return fig


def _layer_colours(layers: Sequence[int]) -> dict[int, str]:
    """One colour per layer that tells neighbours apart: a qualitative palette up to ten layers
    (viridis shades of six layers were hard to tell apart), viridis samples beyond."""
    if len(layers) <= len(qualitative.T10):
        return dict(zip(layers, qualitative.T10))
    return dict(zip(layers, sample_colorscale("Viridis", [i / (len(layers) - 1) for i in range(len(layers))])))


def matching_bars(matching: Sequence[Mapping], title: str = "") -> go.Figure:
    """Per layer, the pre-trained SAE's latents split into kept / shifted / lost when matched to
    the fine-tuned SAE, stacked, next to the same split against a twin SAE trained on the same
    activations with another seed (``baseline_*`` keys, when present): the noise floor, without
    which a "lost" share cannot be read."""
    rows = sorted(matching, key=lambda m: int(m["layer"]))
    pairs = [(prefix, label) for prefix, label in MATCH_PAIRS if all(m.get(f"{prefix}kept") is not None for m in rows)]
    x = [[f"layer {int(m['layer'])}" for m in rows for _ in pairs], [label for _ in rows for _, label in pairs]]
    fig = go.Figure()
    for key, label, colour in MATCH_PARTS:
        y = [m.get(f"{prefix}{key}") for m in rows for prefix, _ in pairs]
        fig.add_trace(
            go.Bar(
                x=x,
                y=y,
                name=label,
                marker_color=colour,
                text=[f"{v:.2f}" if v is not None and v >= 0.1 else "" for v in y],  # smaller parts: hover
                textposition="inside",
                insidetextanchor="middle",
                hovertemplate=f"%{{x}}<br>{label} %{{y:.3f}}<extra></extra>",
            )
        )
    fig.update_layout(barmode="stack", bargap=0.15, legend={"traceorder": "normal"})
    fig.update_xaxes(title="pre-trained SAE matched with")  # labels turn when a narrow window crowds them
    fig.update_yaxes(title="share of the pre-trained SAE's live latents", range=[0, 1])  # dead latents are left out of the matching
    return _layout(fig, esc(title))


# ----------------------------------------------------------------------------- features
def feature_bars(
    values: Mapping[str, float] | Sequence[float],
    labels: Sequence[str] | None = None,
    title: str = "",
    x_title: str = "",
    y_title: str = "",
    horizontal: bool = False,
) -> go.Figure:
    """One bar per label (e.g. mean activation per class, class probabilities, logit effect).

    ``values`` is either a ``{label: value}`` mapping or a list with ``labels`` beside it.
    Negative bars are drawn in red, the rest in blue.
    """
    if isinstance(values, Mapping):
        labels, nums = list(values.keys()), list(values.values())
    else:
        nums = list(values)
        labels = list(labels) if labels is not None else [str(i) for i in range(len(nums))]
    names = [esc(l) for l in labels]
    nums = [float("nan") if v is None else float(v) for v in nums]
    colours = ["#EF553B" if v < 0 else "#636EFA" for v in nums]
    bar = go.Bar(
        x=nums if horizontal else names,
        y=names if horizontal else nums,
        orientation="h" if horizontal else "v",
        marker_color=colours,
        text=[f"{v:#.3g}" for v in nums],  # '#': trailing zeros kept, so 0.53 beside 0.646 reads 0.530
        textposition="auto",
        hovertemplate=("%{y}<br>%{x:.4f}" if horizontal else "%{x}<br>%{y:.4f}") + "<extra></extra>",
    )
    fig = go.Figure(bar, layout={"uniformtext": READABLE_BAR_TEXT})
    cat_axis, val_axis = (fig.update_yaxes, fig.update_xaxes) if horizontal else (fig.update_xaxes, fig.update_yaxes)
    cat_axis(type="category", title=esc(x_title))
    finite = [v for v in nums if math.isfinite(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    pad = 0.1 * (hi - lo) or 1.0  # headroom: the longest bar and its label stay inside the plot
    # exponents, not SI prefixes: a logit contribution of 1.5e-4 read "150µ"
    val_axis(title=esc(y_title), exponentformat="e", range=[lo - (pad if lo < 0 else 0), hi + (pad if hi > 0 else 0)])
    if horizontal:
        fig.update_yaxes(autorange="reversed")
    return _layout(fig, esc(title), height=max(220, 80 + 30 * len(names)) if horizontal else None)


LOG_SPAN = 100  # a histogram's largest count over its smallest from which ``log_y`` draws a log axis


def histogram(edges: Sequence[float], counts: Sequence[int], title: str = "", x_title: str = "activation", log_y: bool = False) -> go.Figure:
    """Bars of precomputed bin ``counts`` between consecutive ``edges`` (len(edges) == len(counts) + 1);
    empty bins after the last filled one are left out."""
    e = np.asarray(edges, dtype=float)
    c = np.asarray(counts, dtype=float)
    if len(e) != len(c) + 1:
        raise ValueError(f"histogram needs len(edges) == len(counts) + 1, got {len(e)} and {len(c)}")
    # Bins past the last non-empty one are dropped: the feature histograms' range is the next
    # power of two above the maximum (exact streaming counts), so up to half of it can be empty.
    filled = np.flatnonzero(c)
    if len(filled):
        c, e = c[: filled[-1] + 1], e[: filled[-1] + 2]
    centres, widths = (e[:-1] + e[1:]) / 2, np.diff(e)
    fig = go.Figure(
        go.Bar(
            x=centres,
            y=c,
            width=widths,
            marker_color="#636EFA",
            customdata=np.stack([e[:-1], e[1:]], axis=1) if len(c) else None,
            hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g})<br>%{y} tokens<extra></extra>",
        )
    )
    fig.update_layout(bargap=0.02)
    fig.update_xaxes(title=esc(x_title))
    # ``log_y``: a log axis labelled at powers of ten only (its default also labels 2 and 5 of each
    # decade), when the counts span two decades or more; a narrower span would get one label or
    # none (counts of 3 to 30: "10"), so it stays linear
    filled_counts = c[c > 0]
    span = filled_counts.max() / filled_counts.min() if len(filled_counts) else 1.0
    fig.update_yaxes(title="tokens", **({"type": "log", "dtick": 1} if log_y and span >= LOG_SPAN else {"type": "linear"}))
    return _layout(fig, esc(title))


def frame_of_similarity(rows: Sequence[Mapping]) -> pd.DataFrame:
    """The similarity rows as a table with the measures in a fixed order."""
    df = pd.DataFrame(list(rows))
    cols = ["layer", *[m for m in MEASURES if m in df.columns]]
    return df[cols + [c for c in df.columns if c not in cols]] if len(df) else df


# ----------------------------------------------------------------------------- HTML token highlighting
_MARKDOWN_CHARS = {c: f"&#{ord(c)};" for c in "*_`$[]\\~:|#!{}"}
HIGHLIGHT_RGB = (255, 140, 0)


def html_text(text) -> str:
    """Text for an HTML snippet shown through markdown: HTML-escaped, markdown/LaTeX/emoji characters as entities."""
    # one character at a time: entities that html.escape writes (&#x27;) hold '#', which must not be escaped again
    return "".join(_MARKDOWN_CHARS.get(c) or html.escape(c, quote=True) for c in str(text))


def token_spans_html(
    tokens: Sequence[str],
    activations: Sequence[float],
    max_value: float | None = None,
    center: int | None = None,
    rgb: tuple[int, int, int] = HIGHLIGHT_RGB,
) -> str:
    """One line of tokens as ``<span>``s whose background alpha is activation / max_value.

    WordPiece continuations (``##ing``) are glued to the previous token; the ``center`` token is
    outlined; hovering a token shows its exact activation. Every token is escaped.
    """
    acts = [0.0 if a is None else float(a) for a in activations]
    top = max_value if max_value and max_value > 0 else max([a for a in acts if a > 0], default=1.0)
    tokens = [str(t) for t in tokens]
    glued = [t.startswith("##") and len(t) > 2 for t in tokens] + [False]
    parts = []
    for i, (tok, act) in enumerate(zip(tokens, acts)):
        shown = tok[2:] if glued[i] else tok
        alpha = min(1.0, max(0.0, act / top))
        # the pieces of one word touch (no padding or rounding where they meet): "reimagined", not "rei ma gin ed"
        open_left, open_right = glued[i], glued[i + 1]  # a side that meets another piece of the word
        pad_l, pad_r = ("0" if open_left else "2px"), ("0" if open_right else "2px")
        round_l, round_r = ("0" if open_left else "3px"), ("0" if open_right else "3px")
        style = f"background-color: rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f}); border-radius: {round_l} {round_r} {round_r} {round_l}; padding: 0 {pad_r} 0 {pad_l};"
        if i == center:
            style += " outline: 1.5px solid #333;"
        title = html_text(f"{tok}: {act:.4f}")
        parts.append(("" if glued[i] or i == 0 else " ") + f'<span style="{style}" title="{title}">{html_text(shown)}</span>')
    return '<div style="line-height: 2; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.9rem;">' + "".join(parts) + "</div>"
