"""Figure builders (core.plots) and the HTML export (core.export): traces, axes, escaping, verdicts."""

from __future__ import annotations

import html
import json
import re

import plotly.graph_objects as go
import numpy as np
import pytest

from core import plots
from core.export import NOT_SUPPORTED, SUPPORTED, UNKNOWN, _table, classification_frame, export_html, layer_groups, matching_frame, paper_claims, sae_frame

EVIL = ["[CLS]", "<script>alert(1)</script>", "<b>x</b>", "a&b", "##ing", "[SEP]"]


def rows_from(values: dict[str, list[float]]) -> list[dict]:
    n = len(next(iter(values.values())))
    return [{"layer": i, **{m: v[i] for m, v in values.items()}} for i in range(n)]


def paper_like(num_layers: int = 12) -> list[dict]:
    """High early, falling through the middle, lowest at the end."""
    curve = [1.0 - 0.005 * l if l <= num_layers // 3 else 0.98 - 0.05 * (l - num_layers // 3) for l in range(num_layers + 1)]
    return rows_from({m: curve for m in plots.MEASURES})


def spec(fig: go.Figure) -> str:
    """The figure JSON with Plotly's \\u003c-style escapes decoded, i.e. the strings the browser gets."""
    return json.dumps(json.loads(fig.to_json()), ensure_ascii=False)


def token_labels(axis) -> list[str]:
    """The tokens a token axis names its positions 0..T-1 by (``labelalias``), in order."""
    alias = dict(axis.labelalias)
    return [alias[str(i)] for i in range(len(alias))]


def validated(fig: go.Figure) -> go.Figure:
    """The figure rebuilt with plotly.py's validation on: raises on any unknown or ill-typed property
    (the token charts are built from plain dicts without it)."""
    return go.Figure(fig.to_plotly_json())


def assert_escaped(text: str) -> None:
    assert "<script>" not in text and "<b>" not in text
    assert "&lt;script&gt;" in text and "&lt;b&gt;x&lt;/b&gt;" in text and "a&amp;b" in text


# ----------------------------------------------------------------------------- similarity
def test_similarity_curves_one_trace_per_run_and_measure():
    runs = {"imdb": paper_like(12), "bbc": paper_like(6)}
    fig = plots.similarity_curves(runs, ["cka", "mean_cosine"])
    assert len(fig.data) == 4
    assert {t.name for t in fig.data} == {"imdb · linear CKA", "imdb · mean cosine", "bbc · linear CKA", "bbc · mean cosine"}
    assert list(fig.data[0].x) == list(range(13))
    assert fig.layout.xaxis.title.text == plots.LAYER_AXIS
    assert fig.data[0].line.dash != fig.data[2].line.dash  # runs differ by dash
    assert fig.data[0].line.color == fig.data[2].line.color  # measures share a colour


def test_similarity_curves_depth_normalised():
    fig = plots.similarity_curves({"a": paper_like(12), "b": paper_like(6)}, ["cka"], normalise_depth=True)
    assert fig.data[0].x[-1] == pytest.approx(1.0) and fig.data[1].x[-1] == pytest.approx(1.0)
    assert fig.data[1].x[1] == pytest.approx(1 / 6)
    assert fig.layout.xaxis.title.text == plots.DEPTH_AXIS


def test_similarity_by_measure_one_panel_per_measure_one_colour_per_run():
    runs = {"imdb": paper_like(12), "<b>x</b>": paper_like(6)}
    fig = validated(plots.similarity_by_measure(runs, ["cosine_of_means", "mean_cosine", "cka"]))
    assert [fig.layout[f"yaxis{i or ''}"].title.text for i in (0, 2, 3)] == ["cosine of means", "mean cosine", "linear CKA"]  # each panel's y axis
    assert fig.layout.yaxis.range == fig.layout.yaxis3.range  # one scale in every panel
    assert [(t.name, t.meta) for t in fig.data] == [(n, m) for n in ("imdb", "&lt;b&gt;x&lt;/b&gt;") for m in ("cosine_of_means", "mean_cosine", "cka")]
    for t in fig.data:  # each line is its run's values of its measure
        rows = runs["imdb" if t.name == "imdb" else "<b>x</b>"]
        assert list(t.y) == [r[t.meta] for r in rows] and list(t.x) == [r["layer"] for r in rows]
    panels = {t.meta: (t.xaxis, t.yaxis) for t in fig.data}
    assert len(set(panels.values())) == 3 and all(panels[t.meta] == (t.xaxis, t.yaxis) for t in fig.data)  # runs share a panel
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[3].line.color  # colour = run
    assert [t.name for t in fig.data if t.showlegend is not False] == ["imdb", "&lt;b&gt;x&lt;/b&gt;"]
    assert fig.layout.xaxis3.title.text == plots.LAYER_AXIS  # the bottom row (2 x 2 grid) names the axis
    assert fig.layout.xaxis4.visible is False and fig.layout.yaxis4.visible is False  # the empty fourth cell shows no axes
    assert fig.layout.xaxis2.title.text == plots.LAYER_AXIS  # ... so the panel above it, last of its column, names the axis
    assert fig.layout.xaxis.visible is not False and fig.layout.xaxis3.visible is not False
    assert plots.similarity_by_measure(runs, plots.MEASURES).layout.xaxis4.visible is not False  # four measures fill the grid
    depth = plots.similarity_by_measure(runs, ["cka"], normalise_depth=True)
    assert depth.data[0].x[-1] == pytest.approx(1.0) and depth.data[1].x[1] == pytest.approx(1 / 6)
    assert depth.layout.xaxis.title.text == plots.DEPTH_AXIS


def test_one_measure_of_one_run_still_has_its_legend():
    """Plotly hides a one-trace legend, which left a single curve unnamed."""
    fig = plots.similarity_curves({"a": paper_like(6)}, ["cka"])
    assert fig.layout.showlegend is True and fig.data[0].name == "linear CKA"


def test_single_run_legend_names_measures_only_and_run_names_are_escaped():
    fig = plots.similarity_curves({"<b>x</b>": paper_like(3)}, plots.MEASURES)
    assert [t.name for t in fig.data] == [plots.MEASURE_LABELS[m] for m in plots.MEASURES]
    fig = plots.similarity_curves({"<b>x</b>": paper_like(3), "other": paper_like(3)}, ["cka"])
    assert fig.data[0].name.startswith("&lt;b&gt;x&lt;/b&gt;")


def test_cka_heatmap_axes():
    matrix = [[1.0, 0.5, 0.2], [0.5, 0.9, 0.3], [0.2, 0.3, 0.4]]
    fig = plots.cka_heatmap(matrix)
    (trace,) = fig.data
    assert trace.type == "heatmap" and trace.zmin == 0 and trace.zmax == 1
    assert [list(r) for r in trace.z] == matrix
    assert "pre-trained" in fig.layout.yaxis.title.text and "fine-tuned" in fig.layout.xaxis.title.text
    assert "%{z:.4f}" in trace.hovertemplate
    # square cells: the y axis follows x, and both shrink their domain in a narrow chart (the
    # default, "range", padded a 7 x 7 matrix with rows -6 to 12 at 1,024 pixels)
    assert fig.layout.yaxis.scaleanchor == "x" and fig.layout.xaxis.constrain == fig.layout.yaxis.constrain == "domain"
    # the colour bar lies below the square, not beside it, where it took a third of a half-width chart
    assert trace.colorbar.orientation == "h" and trace.colorbar.y < 0 and fig.layout.margin.b >= 80


def test_highlight_layers_adds_a_shaded_span():
    fig = plots.highlight_layers(plots.similarity_curves({"r": paper_like(6)}, ["cka"]), [1, 2], "early")
    (shape,) = fig.layout.shapes
    assert shape.x0 == pytest.approx(0.6) and shape.x1 == pytest.approx(2.4)
    (label,) = fig.layout.annotations  # the curve runs high over layers 1-2: the label sits at the bottom, off the line
    assert label.text == "early" and label.yanchor == "bottom" and label.y == 0 and label.yref.endswith("domain")
    falling = rows_from({m: [1.0, 0.99, 0.97, 0.8, 0.5, 0.2, 0.1] for m in plots.MEASURES})
    late = plots.highlight_layers(plots.similarity_curves({"r": falling}, ["cka"]), [5, 6], "late").layout.annotations[0]
    assert late.yanchor == "top"  # low there: at the top


# ----------------------------------------------------------------------------- classification
def test_classification_bars_grouped_precision_recall_f1():
    per_class = {"neg": {"precision": 0.9, "recall": 0.8, "f1-score": 0.85, "support": 10}, "<pos>": {"precision": 0.7, "recall": 0.9, "f1-score": 0.79, "support": 12}, "macro avg": {"precision": 0.8}}
    fig = plots.classification_bars(per_class)
    assert fig.layout.barmode == "group"
    assert [t.name for t in fig.data] == ["precision", "recall", "F1"]
    assert list(fig.data[0].x) == ["neg", "&lt;pos&gt;"]  # summary rows left out, labels escaped
    assert list(fig.data[2].y) == [0.85, 0.79]
    assert all(t.textangle == 0 for t in fig.data)  # two classes: level labels fit
    assert [t.marker.color for t in fig.data] == list(plots.METRIC_COLOURS.values())  # the same colours in the dashboard and the report
    five = plots.classification_bars({f"c{i}": {"precision": 0.8, "recall": 0.85, "f1-score": 0.82} for i in range(5)})
    assert all(t.textangle == -90 for t in five.data) and five.layout.yaxis.range[1] > 1.1  # fifteen bars: upright labels, with room
    # a label plotly.js would shrink below 9 px to fit a narrow bar is left out (hover has it)
    for fig in (five, plots.feature_bars({f"{i} stars": 0.1 * i for i in range(1, 6)})):
        assert fig.layout.uniformtext.minsize == 9 and fig.layout.uniformtext.mode == "hide"
    # a titled chart pins its title to the top, and the legend (above the plot, growing upwards
    # when it wraps in a narrow chart) has room below it: at 1,024 px it ran into the title
    titled = plots.classification_bars(per_class, title="fine-tuned: scores per class")
    assert titled.layout.title.yref == "container" and titled.layout.title.y == 1 and titled.layout.margin.t >= 100
    assert titled.layout.legend.yanchor == "bottom" and titled.layout.legend.y == 1.0


def test_classification_frame_one_row_per_class_and_model():
    per_class = {m: {"neg": {"precision": 1, "recall": 1, "f1-score": 1, "support": 3}, "pos": {"precision": 0.5, "recall": 1, "f1-score": 0.6, "support": 4}} for m in ("pretrained", "finetuned")}
    df = classification_frame(per_class)
    assert list(df.columns) == ["class", "model", "precision", "recall", "f1", "support"]
    assert list(zip(df["class"], df["model"])) == [("neg", "pretrained"), ("neg", "finetuned"), ("pos", "pretrained"), ("pos", "finetuned")]


# ----------------------------------------------------------------------------- tokens
def test_token_heatmap_escapes_labels_and_keeps_repeated_tokens_apart():
    z = [[0.1 * i for i in range(len(EVIL))], [0.2] * len(EVIL)]
    fig = validated(plots.token_heatmap(z, EVIL, ["emb", "<i>layer</i>"], title="<b>t</b>"))
    (trace,) = fig.data
    assert list(trace.x) == list(range(len(EVIL)))
    ticks = token_labels(fig.layout.xaxis)
    assert ticks[1] == "&lt;script&gt;alert(1)&lt;/script&gt;" and ticks[2] == "&lt;b&gt;x&lt;/b&gt;"
    assert list(fig.layout.yaxis.ticktext) == ["emb", "&lt;i&gt;layer&lt;/i&gt;"]
    assert trace.customdata[1][2] == ["&lt;b&gt;x&lt;/b&gt;", "&lt;i&gt;layer&lt;/i&gt;"]
    assert "customdata[0]" in trace.hovertemplate and "customdata[1]" in trace.hovertemplate and "%{z:.4f}" in trace.hovertemplate
    assert_escaped(spec(fig))
    fig2 = plots.token_heatmap([[1, 2, 3]], ["the", "the", "the"], ["r"])
    assert len(fig2.data[0].x) == 3 and token_labels(fig2.layout.xaxis) == ["the"] * 3


def test_token_heatmap_diverging_is_centred_at_zero():
    fig = validated(plots.token_heatmap([[-0.5, 0.2, 2.0]], ["a", "b", "c"], ["diff"], diverging=True))
    (trace,) = fig.data
    assert trace.zmid == 0 and trace.zmin == -2.0 and trace.zmax == 2.0
    assert trace.colorscale == go.Heatmap(colorscale="RdBu").colorscale
    seq = validated(plots.token_heatmap([[0.1, 0.2]], ["a", "b"], ["r"], zrange=(0, 1))).data[0]
    assert seq.zmid is None and seq.zmin == 0 and seq.zmax == 1


def test_feature_comparison_shares_the_token_axis_and_centres_the_difference():
    raw = plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3])
    assert [list(r) for r in raw.data[0].z] == [[0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3]]
    assert list(raw.data[1].z[0]) == [0, 1, -1, 0, 0, 3]
    fig = validated(raw)
    sequential, diverging = fig.data
    assert diverging.zmid == 0 and diverging.zmin == -3 and diverging.zmax == 3
    assert sequential.zmid is None
    # the labelled token axis is "x", at the bottom (the difference); the panel above follows it
    assert (sequential.xaxis, sequential.yaxis, diverging.xaxis, diverging.yaxis) == ("x2", "y2", "x", "y")
    assert fig.layout.xaxis2.matches == "x" and fig.layout.xaxis2.showticklabels is False
    assert token_labels(fig.layout.xaxis) == [plots.esc(t) for t in EVIL]
    assert fig.layout.yaxis2.domain[0] > fig.layout.yaxis.domain[1]  # the difference row sits below, apart
    # the difference row says which way round, on two lines no wider than "pre-trained"; its short
    # colour bar is signed at both ends, the high (blue) end being "fine-tuned higher"
    assert list(fig.layout.yaxis.ticktext) == ["fine-tuned −<br>pre-trained"]
    assert list(diverging.colorbar.ticktext) == ["-3", "+3"] and list(diverging.colorbar.tickvals) == [-3, 3]
    assert list(sequential.colorbar.ticktext) == ["0", "3"]  # a sequential scale stays unsigned
    assert diverging.colorscale[-1][1] == "rgb(5,48,97)"  # ColorBrewer RdBu: positive = blue
    one_line = plots.feature_comparison(["a"], [0.0], [1.0], row_labels=("pre-trained", "fine-tuned −pre-trained"))
    assert one_line.layout.margin.l > raw.layout.margin.l  # the margin follows the longest line
    assert_escaped(spec(fig))


def test_feature_comparison_with_top_features_below_on_the_same_tokens():
    top_values = [[0, 5, 0, 0, 1, 0], [2, 0, 0, 0, 0, 0], [0, 0, 0, 3, 0, 0]]
    raw = plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], title="f", subtitle="top <3>", top=(["feature 7", "<i>f</i>", "feature 2"], top_values))
    assert [list(r) for r in raw.data[2].z] == top_values
    fig = validated(raw)
    feature, difference, top = fig.data
    assert [(t.xaxis, t.yaxis) for t in fig.data] == [("x2", "y2"), ("x3", "y3"), ("x", "y")]
    assert fig.layout.xaxis2.matches == fig.layout.xaxis3.matches == "x"  # one token axis for all three panels
    assert fig.layout.xaxis2.showticklabels is False and fig.layout.xaxis3.showticklabels is False
    assert list(fig.layout.yaxis.ticktext) == ["feature 7", "&lt;i&gt;f&lt;/i&gt;", "feature 2"]
    assert top.customdata[1][3] == ["a&amp;b", "&lt;i&gt;f&lt;/i&gt;"]
    # panels from top to bottom, apart, the top-features panel three times the difference row's height
    (f0, f1), (d0, d1), (t0, t1) = fig.layout.yaxis2.domain, fig.layout.yaxis3.domain, fig.layout.yaxis.domain
    assert f0 > d1 and d0 > t1 and t0 == pytest.approx(0.0, abs=1e-3) and f1 == pytest.approx(1.0)
    assert (t1 - t0) == pytest.approx(3 * (d1 - d0), rel=1e-3)
    assert top.zmin == 0 and difference.zmid == 0 and feature.zmax == top.zmax == 5  # one scale: the feature rows' 3 and the top features' 5
    assert fig.layout.title.subtitle.text == "top &lt;3&gt;"
    two = plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3])
    assert fig.layout.height > two.layout.height
    assert_escaped(spec(fig))


def test_feature_comparison_takes_shared_colour_scale_ends():
    """Two sentences compared: the explorer passes the largest values of both, so one colour means
    one value in both charts; without them each chart fits its own data."""
    top = (["feature 7"], [[0, 5, 0, 0, 1, 0]])
    own = validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], top=top))
    assert (own.data[0].zmin, own.data[0].zmax) == (0, 5) == (own.data[2].zmin, own.data[2].zmax)  # feature rows and top features: one scale
    assert (own.data[1].zmin, own.data[1].zmax) == (-5, 5)  # a change of 3 drawn against activations up to 5, not as strong as they
    assert validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], top=(["feature 7"], [[0, 1, 2, 0, 0, 1]]))).data[2].zmax == 3  # the feature rows' larger end
    positive = validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], top=(["feature 7"], [[1, 5, 2, 2, 1, 3]])))
    assert (positive.data[2].zmin, positive.data[2].zmax) == (0, 5)  # dark still means 0 when no token is at 0 (plotly.js drops a lone zmin)
    fixed = validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], top=top, feature_max=7.5, difference_bound=4.0, top_max=9.0))
    feature, difference, top_panel = fixed.data
    assert (feature.zmin, feature.zmax) == (0, 9.0) == (top_panel.zmin, top_panel.zmax)  # the larger of the two ends passed
    assert (difference.zmin, difference.zmid, difference.zmax) == (-9.0, 0, 9.0)  # no stronger than the activations
    assert list(difference.colorbar.ticktext) == ["-9", "+9"]  # the short bar's ends name the shared bound
    small = validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], feature_max=0.5, difference_bound=4.0)).data[1]
    assert (small.zmin, small.zmax) == (-4.0, 4.0)  # a difference larger than the activation scale passed is never clipped
    change = (["feature 7"], [[0, -5, 0, 0, 2, 0]])  # top features ranked by change: their differences
    diverging = validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], top=change, top_difference=True)).data[2]
    assert (diverging.zmin, diverging.zmid, diverging.zmax) == (-5, 0, 5) and "difference %{z" in diverging.hovertemplate
    assert (validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], top=change, top_difference=True)).data[1].zmax) == 5  # one scale with the difference row
    assert diverging.colorscale[-1][1] == "rgb(5,48,97)"  # blue: higher on the fine-tuned model, as in the difference row


def test_narrow_charts_wrap_their_titles_and_make_room():
    title = "Cosine per layer, and feature 1234 (pre-trained SAE, layer 6) on each model <b>"
    sub = "top: cosine of the pre-trained and fine-tuned hidden states per token; below the feature: the top 8 features"
    one = validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], title=title, subtitle=sub))
    wrapped = validated(plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], title=title, subtitle=sub, wrap=40))
    assert "<br>" not in one.layout.title.text and one.layout.title.text == plots.esc(title)
    head, tail = wrapped.layout.title.text.split("<br>"), wrapped.layout.title.subtitle.text.split("<br>")
    assert len(head) == 3 and len(tail) == 3 and all(len(line) <= 40 for line in head) and all(len(line) <= 52 for line in tail)
    assert " ".join(head) == plots.esc(title) and "&lt;b&gt;" in head[-1]  # escaped line by line, no text lost
    extra = 2 * plots.TITLE_LINE_PX + 2 * plots.SUBTITLE_LINE_PX
    assert wrapped.layout.margin.t == one.layout.margin.t + extra and wrapped.layout.height == one.layout.height + extra
    assert (wrapped.layout.title.yref, wrapped.layout.title.yanchor) == ("container", "top")  # pinned, so lines grow down
    heat = validated(plots.token_heatmap([[1.0, 0.5]], ["a", "b"], ["emb"], title=title, wrap=40))
    assert heat.layout.title.text.count("<br>") == 2 and heat.layout.margin.t == 80 + 2 * plots.TITLE_LINE_PX


def test_feature_comparison_with_the_cosine_map_on_top():
    """The explorer's one chart per sentence: cosine rows above the feature, every panel on the
    labelled token axis at the bottom, the cosine on its own scale from the given low end to 1."""
    cosine = [[0.5, None, 1.0, 0.9, 0.8, 0.7], [0.2, 0.3, 0.4, 0.5, 0.6, -0.1]]
    top = (["feature 7", "feature 2"], [[0, 5, 0, 0, 1, 0], [2, 0, 0, 0, 0, 0]])
    raw = plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], title="f", top=top, cosine=(["emb", "<i>layer 1</i>"], cosine), cosine_low=-0.1, cut_after=2)
    fig = validated(raw)
    assert [t.name for t in fig.data] == ["cosine", "feature", "difference", "top features"]
    assert [(t.xaxis, t.yaxis) for t in fig.data] == [("x2", "y2"), ("x3", "y3"), ("x4", "y4"), ("x", "y")]
    assert all(fig.layout[f"xaxis{i}"].matches == "x" for i in (2, 3, 4)) and token_labels(fig.layout.xaxis) == [plots.esc(t) for t in EVIL]
    assert {fig.layout[f"xaxis{i}"].type for i in ("", 2, 3, 4)} == {"category"}  # matched axes share the type
    c = fig.data[0]
    z = np.asarray(raw.data[0].z, dtype=float)
    assert np.isnan(z[0, 1]) and z[1, 5] == -0.1 and z[0, 2] == 1.0  # None drawn as a gap, values as given
    viridis = go.Heatmap(colorscale="Viridis").colorscale
    assert (c.zmin, c.zmax) == (-0.1, 1.0) and [col for _, col in c.colorscale] == [col for _, col in viridis]
    assert [stop for stop, _ in c.colorscale] == pytest.approx([stop for stop, _ in viridis], abs=1e-6)
    assert "cosine %{z" in c.hovertemplate and list(fig.layout.yaxis2.ticktext) == ["emb", "&lt;i&gt;layer 1&lt;/i&gt;"]
    assert c.customdata[1][3] == ["a&amp;b", "&lt;i&gt;layer 1&lt;/i&gt;"]
    domains = [fig.layout[f"yaxis{i}"].domain for i in (2, 3, 4)] + [fig.layout.yaxis.domain]
    assert all(upper[0] > lower[1] for upper, lower in zip(domains, domains[1:]))  # top to bottom, apart
    assert (domains[0][1] - domains[0][0]) == pytest.approx(2 * (domains[2][1] - domains[2][0]), rel=1e-3)  # 2 rows vs 1
    (line,) = fig.layout.shapes
    assert line.yref == "paper" and (line.y0, line.y1) == (0, 1)  # the cut crosses the cosine rows too
    without = plots.feature_comparison(EVIL, [0, 1, 2, 0, 0, 0], [0, 2, 1, 0, 0, 3], title="f", top=top)
    assert fig.layout.height == without.layout.height + 30 * 2
    assert_escaped(spec(fig))


# ----------------------------------------------------------------------------- features
def test_feature_bars_from_mapping_and_negative_colour():
    fig = plots.feature_bars({"neg": -0.5, "<pos>": 1.5}, title="effect")
    (bar,) = fig.data
    assert list(bar.x) == ["neg", "&lt;pos&gt;"] and list(bar.y) == [-0.5, 1.5]
    assert bar.marker.color[0] != bar.marker.color[1]
    assert list(plots.feature_bars({"a": 0.646, "b": 0.53}).data[0].text) == ["0.646", "0.530"]  # same precision side by side
    h = plots.feature_bars([0.2, 0.8], labels=["a", "b"], horizontal=True).data[0]
    assert h.orientation == "h" and list(h.y) == ["a", "b"]
    assert list(fig.layout.yaxis.range) == pytest.approx([-0.7, 1.7])  # a tenth of the span beyond each end
    tiny = plots.feature_bars({"a": 1.5e-4, "b": 0.5e-4})
    assert tiny.layout.yaxis.exponentformat == "e" and tiny.layout.yaxis.range[0] == 0 and tiny.layout.yaxis.range[1] == pytest.approx(1.65e-4)


def test_histogram_uses_bin_edges():
    fig = plots.histogram([0, 1, 2, 4], [5, 3, 1])
    (bar,) = fig.data
    assert list(bar.x) == [0.5, 1.5, 3.0] and list(bar.width) == [1, 1, 2] and list(bar.y) == [5, 3, 1]
    with pytest.raises(ValueError):
        plots.histogram([0, 1], [1, 2])


def test_histogram_leaves_out_empty_bins_after_the_last_filled_one():
    """Feature histograms span [0, next power of two above the max]: the empty top half is not drawn."""
    edges = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    fig = plots.histogram(edges, [4, 0, 2, 1, 0, 0, 0, 0])
    validated(fig)
    (bar,) = fig.data
    assert list(bar.x) == [0.5, 1.5, 2.5, 3.5] and list(bar.y) == [4, 0, 2, 1]  # a gap inside is kept
    assert [list(c) for c in bar.customdata][-1] == [3, 4]
    (empty,) = plots.histogram([0, 1, 2], [0, 0]).data
    assert list(empty.y) == [0, 0]  # nothing filled: drawn as given
    log = validated(plots.histogram(edges, [400, 0, 2, 1, 0, 0, 0, 0], log_y=True))
    assert log.layout.yaxis.type == "log" and log.layout.yaxis.dtick == 1  # labels at powers of ten only
    narrow = validated(plots.histogram(edges, [30, 0, 12, 3, 0, 0, 0, 0], log_y=True))
    assert narrow.layout.yaxis.type == "linear"  # 3 to 30: a log axis would be labelled at 10 alone
    assert validated(plots.histogram(edges[:5], [99, 0, 1, 1], log_y=True)).layout.yaxis.type == "linear"
    assert validated(plots.histogram(edges[:5], [100, 0, 1, 1], log_y=True)).layout.yaxis.type == "log"
    assert validated(plots.histogram(edges, [1] * 8)).layout.yaxis.type == "linear"


def test_token_spans_html_escapes_every_token():
    out = plots.token_spans_html(EVIL, [0, 2.0, 1.0, 0.5, 0.5, 0], center=1)
    assert "<script>" not in out and "<b>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out and "&lt;b&gt;x&lt;/b&gt;" in out and "a&amp;b" in out
    assert "rgba(255,140,0,1.00)" in out and "rgba(255,140,0,0.50)" in out and "outline" in out
    assert ">a&amp;b</span><span" in out  # "##ing" glued to the previous token without a space
    assert 'title="&lt;b&gt;x&lt;/b&gt;&#58; 1.0000"' in out


def test_the_pieces_of_one_word_touch():
    """No padding or rounded corner where a word's pieces meet: "reimagined", not "rei ma gin ed"."""
    import re

    out = plots.token_spans_html(["the", "rei", "##ma", "##gined", "film"], [0, 1, 1, 1, 0])
    spans = re.findall(r'<span style="([^"]*)"[^>]*>([^<]*)</span>', out)
    assert [text for _, text in spans] == ["the", "rei", "ma", "gined", "film"]
    assert re.sub(r"<[^>]*>", "", out) == "the reimagined film"  # what the eye reads
    pads = [re.search(r"padding: ([^;]*);", style)[1] for style, _ in spans]
    assert pads == ["0 2px 0 2px", "0 0 0 2px", "0 0 0 0", "0 2px 0 0", "0 2px 0 2px"]


def test_html_text_reads_back_as_the_original_text():
    """Every character comes out as itself or as one entity: the browser shows what was typed."""
    import html
    import re

    for text in ["it's #1 & <b>\"x\"</b>", "$a$ *b* _c_ `d` [e](f) ~g~ :h: |i| !j {k} \\", *EVIL]:
        out = plots.html_text(text)
        assert html.unescape(out) == text, out
        assert not re.search(r"[<>\"'*_`$\[\]~:|#!{}\\]", re.sub(r"&#?\w+;", "", out)), out  # nothing raw for HTML or markdown


# ----------------------------------------------------------------------------- claims
def test_layer_groups_split_blocks_in_thirds():
    assert layer_groups(12) == {"early": [1, 2, 3, 4], "middle": [5, 6, 7, 8], "late": [9, 10, 11, 12]}
    assert layer_groups(6) == {"early": [1, 2], "middle": [3, 4], "late": [5, 6]}
    assert layer_groups(2) == {"early": [1], "middle": [], "late": [2]}


def test_paper_claims_supported_on_a_paper_like_curve():
    claims = paper_claims(paper_like(12))
    assert [c["verdict"] for c in claims] == [SUPPORTED] * 3
    assert claims[0]["numbers"]["min_cka"] >= 0.9
    assert claims[2]["numbers"]["lowest_layer_cka"] == 12


def test_every_claim_number_has_a_label_in_words():
    from core.export import quantity_label

    keys = [k for c in paper_claims(paper_like(12)) for k in c["numbers"]]
    assert len(keys) == 1 + 2 + 6 + 8  # last layer; lowest per measure; group means; the late claim's four per measure
    labels = {k: quantity_label(k) for k in keys}
    assert len(set(labels.values())) == len(keys) and not any("_" in v for v in labels.values()), labels
    assert labels["largest_drop_into_cka"] == "layer after the largest linear CKA drop"
    assert labels["largest_drop_mean_cosine"] == "largest mean cosine drop between neighbouring layers"
    assert labels["middle_cka"] == "linear CKA, middle layers (mean)" and labels["last_layer"] == "last layer"
    assert quantity_label("something_new") == "something new"


def test_paper_claims_not_supported_when_the_numbers_say_otherwise():
    flat_then_dip = rows_from({m: [0.5, 0.5, 0.4, 0.3, 0.35, 0.6, 0.7] for m in plots.MEASURES})
    claims = paper_claims(flat_then_dip)
    assert claims[0]["verdict"] == NOT_SUPPORTED  # early layers far below 0.9
    assert claims[2]["verdict"] == NOT_SUPPORTED  # the last layer is not the lowest
    assert claims[2]["numbers"]["lowest_layer_cka"] == 3
    assert "0.9" in claims[0]["explanation"]


def test_paper_claims_too_few_layers_cannot_be_assessed():
    claims = paper_claims(paper_like(2))
    assert claims[1]["verdict"] == UNKNOWN



def test_paper_claims_on_an_undefined_cka_cannot_be_assessed():
    """CKA is NaN where a hidden state is constant over the tokens: no claim is judged on it (NaN
    compares False, which read as "not supported" before), and the explanation names where."""
    rows = paper_like(6)
    rows[3]["cka"] = float("nan")
    claims = paper_claims(rows)
    assert [c["verdict"] for c in claims] == [UNKNOWN] * 3 and not any(c["supported"] or c["numbers"] for c in claims)
    assert all("linear CKA at hidden state 3" in c["explanation"] for c in claims)
    assert [c["verdict"] for c in paper_claims(paper_like(6))] == [SUPPORTED] * 3  # the same curve, defined

def test_claim_threshold_is_respected():
    rows = paper_like(12)
    assert paper_claims(rows, threshold=0.999)[0]["verdict"] == NOT_SUPPORTED


def sae_entry(model: str, layer: int, steps: list[int], mse: list[float], fvu: float) -> dict:
    return {"model": model, "layer": layer, "fvu": fvu, "loss_curve": {"step": steps, "mse": mse, "l0": [32.0] * len(steps)}}


def test_sae_training_curves_one_line_per_sae_and_its_held_out_fvu_at_the_end():
    rng = np.random.default_rng(0)
    saes = [sae_entry(m, l, [20, 40, 55], rng.uniform(0.1, 0.9, 3).round(4).tolist(), round(float(rng.uniform(0.1, 0.3)), 4)) for m in ("finetuned", "pretrained") for l in (3, 1, 2)]
    saes.append({"model": "pretrained", "layer": 4, "fvu": 0.5})  # metrics written before curves were kept: left out
    fig = validated(plots.sae_training_curves(saes))
    lines = [t for t in fig.data if t.mode == "lines"]
    marks = [t for t in fig.data if t.mode == "markers"]
    assert len(lines) == len(marks) == 6
    panels = {"pretrained": "x", "finetuned": "x2"}  # pre-trained on the left whatever the order given
    for s in saes[:6]:
        (line,) = [t for t in lines if t.name == f"layer {s['layer']}" and t.xaxis == panels[s["model"]]]
        assert list(line.x) == s["loss_curve"]["step"] and list(line.y) == s["loss_curve"]["mse"]
        (mark,) = [t for t in marks if t.name == f"layer {s['layer']}, held-out FVU" and t.xaxis == panels[s["model"]]]
        assert list(mark.x) == [55] and list(mark.y) == [s["fvu"]]
        assert mark.marker.color == line.line.color
    assert sum(t.showlegend is not False for t in lines) == 3  # one legend entry per layer
    colours = [next(t.line.color for t in lines if t.name == f"layer {l}" and t.xaxis == "x") for l in (1, 2, 3)]
    assert len(set(colours)) == 3  # each layer its own colour, the same on both panels
    assert [a.text for a in fig.layout.annotations] == ["pre-trained SAEs", "fine-tuned SAEs"]
    for n in (6, 13):  # MiniLM's SAE layers, and every hidden state of a 12-layer BERT
        assert len(set(plots._layer_colours(list(range(n))).values())) == n


def test_matching_bars_stack_kept_shifted_lost_beside_the_seed_twin():
    rows = []
    for layer in (2, 1):
        kept, shifted = 0.1 * layer, 0.2
        rows.append({"layer": layer, "kept": kept, "shifted": shifted, "lost": 1 - kept - shifted, "new": 0.5, "baseline_kept": 0.3, "baseline_shifted": 0.3, "baseline_lost": 0.4, "baseline_new": 0.4})
    fig = validated(plots.matching_bars(rows))
    assert [t.name for t in fig.data] == ["kept", "shifted", "lost (no similar partner)"] and fig.layout.barmode == "stack"
    x = [list(level) for level in fig.data[0].x]
    assert x == [["layer 1", "layer 1", "layer 2", "layer 2"], ["fine-tuned", "seed twin"] * 2]
    by_layer = {r["layer"]: r for r in rows}
    for trace, key in zip(fig.data, ("kept", "shifted", "lost")):
        want = [v for l in (1, 2) for v in (by_layer[l][key], by_layer[l][f"baseline_{key}"])]
        assert list(trace.y) == pytest.approx(want)
    totals = np.sum([list(t.y) for t in fig.data], axis=0)
    np.testing.assert_allclose(totals, 1.0)  # every latent of the pre-trained SAE is in one part
    # without a seed baseline, one bar per layer
    bare = plots.matching_bars([{k: v for k, v in r.items() if not k.startswith("baseline_")} for r in rows])
    assert [list(level) for level in bare.data[0].x] == [["layer 1", "layer 2"], ["fine-tuned"] * 2]


def test_matching_frame_flattens_counts():
    matching = [
        {"layer": 1, "kept": 0.5, "shifted": 0.2, "new": 0.1, "lost": 0.3, "counts": {"kept": 5, "new": 1}, "pairs": [[0, 3], [1, 2]]},
        {"layer": 2, "kept": 0.25, "shifted": 0.5, "new": 0.4, "lost": 0.25, "counts": {"kept": 2, "shifted": 4, "lost": 2}},
        {"layer": 3, "kept": 0.0, "shifted": 0.0, "new": 1.0, "lost": 1.0},  # no counts at all
    ]
    df = matching_frame(matching)
    assert len(df) == len(matching)
    scalars = ["layer", "kept", "shifted", "new", "lost"]
    count_keys = ["kept", "new", "shifted", "lost"]  # in the order the rows first name them
    assert list(df.columns) == scalars + [f"{k} (count)" for k in count_keys]  # nested values (pairs) dropped
    for i, m in enumerate(matching):
        for k in scalars:
            assert df[k].iloc[i] == m[k]
        for k in count_keys:
            want = m.get("counts", {}).get(k)
            got = df[f"{k} (count)"].iloc[i]
            assert np.isnan(got) if want is None else got == want, (i, k, got, want)


# ----------------------------------------------------------------------------- HTML export
def test_export_html_is_self_contained_and_escaped(tiny_run, tmp_path):
    import shutil

    from core.files import write_json
    from core.runfolder import RunFolder, read_json

    run = RunFolder(tmp_path / "<b>x<i>")
    shutil.copytree(tiny_run.root, run.root)
    m = read_json(run.manifest_path)
    m["config"]["data"]["dataset"] = "<script>alert(1)</script>.csv"
    write_json(run.manifest_path, m)
    out = export_html(run)
    assert out.startswith("<!DOCTYPE html>") and out.rstrip().endswith("</html>")
    assert "<script>alert(1)</script>" not in out and "<b>x<i>" not in out
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.csv" in out and "&lt;b&gt;x&lt;i&gt;" in out
    assert "<script src=" not in out  # plotly.js inlined, not fetched
    assert out.count("Plotly.newPlot") >= 5
    assert "Classification report" in out and "Layer similarity" in out and "claims" in out
    assert run.is_done("saes") and run.is_done("features")  # the tiny run has every section
    assert "Sparse autoencoders" in out and "SAE training curves" in out
    from core.report import build_report, sae_bar_misses

    misses = sae_bar_misses(build_report(run)["saes"])  # the tiny run's SAEs miss some bars
    assert misses and all(f"<li>{html.escape(m.line)}</li>" in out for m in misses)
    assert "against a seed twin" in out
    assert out.count('<div class="wide"><table') == out.count("<table")  # wide tables scroll, not overflow
    # the SAE table shows the quality figures, every column one click away; models named as in the charts
    sae_part = out[out.index("Sparse autoencoders (held-out tokens)") :]
    compact, every = sae_part.split("<details><summary>Every column</summary>", 1)
    assert "<th>fvu</th>" in compact and "<th>mse</th>" not in compact.split("</table>")[0]
    assert "<th>mse</th>" in every.split("</details>")[0]
    assert "<td>pre-trained</td>" in compact and "<td>pretrained</td>" not in out
    l0 = build_report(run)["saes"][0]["l0"]
    assert f"<td>{l0:.1f}</td>" in compact and f"<td>{l0:.4f}</td>" not in out  # a count of latents, one decimal
    json.dumps(out)  # a plain string


def test_export_html_names_local_folders_by_their_last_part_only(tiny_run, tmp_path):
    """A report is sent to others: it names the run, and a model or dataset read from a local
    folder, without the author's folders; hub ids stay whole. The overview shows the full paths."""
    import shutil

    from core.export import summary_rows
    from core.files import write_json
    from core.report import build_report
    from core.runfolder import RunFolder, read_json

    run = RunFolder(tmp_path / "home_of_ana" / "my_run")
    shutil.copytree(tiny_run.root, run.root)
    m = read_json(run.manifest_path)
    m["config"]["model"]["base"] = "google/bert_uncased_L-2_H-128_A-2"
    m["config"]["data"]["dataset"] = str(tmp_path / "home_of_ana" / "reviews.csv")
    write_json(run.manifest_path, m)
    out = export_html(run)
    assert "home_of_ana" not in out and str(tmp_path) not in out
    for name in ("my_run", "reviews.csv", "google/bert_uncased_L-2_H-128_A-2"):
        assert f"<td>{name}</td>" in out, name
    local = dict(summary_rows(build_report(run)))
    assert local["run"] == str(run.root.resolve()) and local["dataset"] == m["config"]["data"]["dataset"]


def test_export_html_judges_claim_one_at_the_threshold_given(tiny_run):
    """The report follows the overview's slider: claim 1's verdict and explanation are those of
    ``paper_claims`` at that threshold, and the threshold is printed."""
    import re

    from core.report import build_report

    rows = build_report(tiny_run)["similarity"]
    early = min(r[m] for r in rows if 1 <= r["layer"] <= max(layer_groups(len(rows) - 1)["early"]) for m in ("cka", "mean_cosine"))
    verdicts = set()
    for threshold in (round(early - 0.05, 2), round(early + 0.05, 2)):
        claim = paper_claims(rows, threshold)[0]
        out = export_html(tiny_run, threshold)
        assert f"at or above {threshold:.2f}" in out
        assert f'"text":"high = {threshold:g}"' in out  # the claim figure draws the same line as the overview's
        first = re.search(r"<span class='verdict [^']+'>([^<]+)</span> &mdash; ([^<]+)</p>", out)
        assert first.groups() == (html.escape(claim["verdict"]), html.escape(claim["explanation"]))
        verdicts.add(claim["verdict"])
    assert verdicts == {SUPPORTED, NOT_SUPPORTED}  # the two thresholds straddle the run's lowest early value


def test_sae_frame_puts_fidelity_together_and_small_numbers_stay_readable():
    df = sae_frame([{"model": "finetuned", "layer": 6, "fvu": 0.097, "accuracy_spliced": 0.867, "kl_spliced": 0.00002, "dead_fraction": 0.00066, "mse": 0.1, "rare_tokens": {"token_share": 0.29}}])
    cols = list(df.columns)
    assert cols.index("kl_spliced") == cols.index("accuracy_spliced") + 1 and cols[-1] == "mse"
    html_table = _table(df)
    assert "2.00e-05" in html_table and "0.0007" in html_table and "0.8670" in html_table and "0.2900" in html_table


def test_token_charts_size_their_margins_from_the_labels():
    """No automargin (the browser would measure every label on each redraw); the fixed margins
    still leave room for the longest rotated token and the longest row label."""
    short = plots.token_heatmap([[1.0, 2.0]], ["a", "b"], ["layer 1"])
    long = plots.token_heatmap([[1.0, 2.0]], ["a", "<extraordinary>"], ["a much longer row label"])
    for fig in (short, long):
        assert fig.layout.xaxis.automargin is False and fig.layout.yaxis.automargin is False
        assert fig.layout.xaxis.ticklabeloverflow == "allow"  # else plotly.js re-measures every label per label
    assert long.layout.margin.b >= 6 * len("<extraordinary>") > short.layout.margin.b
    assert long.layout.margin.l >= 7 * len("a much longer row label") > short.layout.margin.l
    comparison = plots.feature_comparison(["[CLS]", "cinematography", "[SEP]"], [0, 1, 0], [0, 2, 0])
    assert comparison.layout.margin.b >= 6 * len("cinematography") and comparison.layout.xaxis2.automargin is False


def colour_bar_spans(fig: go.Figure) -> list[tuple[float, float, str]]:
    """(bottom px, top px, title) of every colour bar, measured from the bottom of the plot area."""
    plot_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    spans = []
    for trace in fig.data:
        bar = trace.colorbar
        assert bar.ypad == 0 and bar.yanchor in (None, "middle")
        length = bar.len if bar.lenmode == "pixels" else bar.len * plot_px
        centre = bar.y * plot_px
        spans.append((centre - length / 2, centre + length / 2, bar.title.text or ""))
    return sorted(spans)


@pytest.mark.parametrize("n_cosine", [0, 7, 13])
@pytest.mark.parametrize("n_top", [0, 1, 3, 8, 20])
@pytest.mark.parametrize("tokens", [["[CLS]", "a", "[SEP]"], ["[CLS]", "cinematography", "extraordinarily", "[SEP]"], ["[CLS]", "supercalifragilisticexpialidocious", "[SEP]"]])
def test_stacked_colour_bars_never_touch_and_titles_fit(n_top, tokens, n_cosine):
    """The match panel's two bars overlapped (each as tall as its panel, end labels colliding, and
    "difference" longer than its bar). Every bar now ends at least 12 px (a tick label) from the
    next, and a title is drawn only along a bar at least as long as the title (7 px a character)."""
    n = len(tokens)
    top = ([f"feature {i}" for i in range(n_top)], [[float(i + t) for t in range(n)] for i in range(n_top)]) if n_top else None
    cosine = ([f"layer {i}" for i in range(n_cosine)], [[0.5] * n for _ in range(n_cosine)]) if n_cosine else None
    fig = validated(plots.feature_comparison(tokens, [0.0] * n, [1.0] * n, title="f", top=top, cosine=cosine))
    spans = colour_bar_spans(fig)
    assert len(spans) == 2 + bool(n_top) + bool(n_cosine)
    for (lo1, hi1, _), (lo2, hi2, _) in zip(spans, spans[1:]):
        assert lo2 - hi1 >= 12, spans
    for lo, hi, title in spans:
        assert lo >= -1 and hi > lo  # inside the plot area
        assert not title or hi - lo >= 7 * len(title), (title, hi - lo)
    short = [t for t in fig.data if t.colorbar.lenmode == "pixels" and t.colorbar.len < 60]
    assert all(len(t.colorbar.tickvals) == 2 for t in short)  # a short bar is labelled at its two ends only


def test_every_token_is_on_the_axis_and_long_texts_say_to_hover():
    """The token axis names every position by its token; plotly.js labels as many as the drawn
    width fits (``test_the_browser_labels_as_many_tokens_as_the_width_fits``)."""
    tokens = [f"t{i}" for i in range(200)]
    z = [[float(i) for i in range(200)]]
    fig = validated(plots.token_heatmap(z, tokens, ["layer 1"]))
    assert fig.layout.xaxis.type == "category" and fig.layout.xaxis.tickmode in (None, "auto")
    assert token_labels(fig.layout.xaxis) == tokens and list(fig.data[0].x) == list(range(200))
    assert "hover for every token" in fig.layout.xaxis.title.text
    assert [c[0] for c in fig.data[0].customdata[0]] == tokens  # every token has its hover
    comparison = validated(plots.feature_comparison(tokens, z[0], z[0]))
    assert token_labels(comparison.layout.xaxis) == tokens and comparison.layout.xaxis2.type == "category"
    short = tokens[: plots.HOVER_HINT_TOKENS]
    few = validated(plots.feature_comparison(short, z[0][: len(short)], z[0][: len(short)]))
    assert not few.layout.xaxis.title.text  # a short text: every token fits, no hint
    assert comparison.layout.margin.b > few.layout.margin.b  # room for the axis title


def svg_tick_positions(fig: go.Figure, width: int) -> list[tuple[float, str]]:
    """(x in px, text) of the token axis's labels as plotly.js (through kaleido) draws ``fig`` ``width`` px wide."""
    svg = fig.to_image(format="svg", width=width, height=fig.layout.height).decode()
    ticks = re.findall(r'<g class="xtick"><text[^>]*transform="translate\(([-\d.]+),[^"]*"[^>]*>([^<]*)</text>', svg)
    return [(float(x), html.unescape(t)) for x, t in ticks]


def test_the_browser_labels_as_many_tokens_as_the_width_fits():
    """A category axis is labelled at every n-th token, n from the drawn width: all 60 tokens in a
    wide chart, fewer and never crowded in a narrow one (the explorer at 1,024 px, two sentences
    side by side), where a fixed count of labels overlapped."""
    pytest.importorskip("kaleido")
    tokens = ["[CLS]", *[f"w{i}" for i in range(58)], "[SEP]"]
    fig = plots.feature_comparison(tokens, [0.0] * 60, [1.0] * 60, title="f")
    wide, narrow = svg_tick_positions(fig, 2000), svg_tick_positions(fig, 450)
    assert [t for _, t in wide] == tokens  # each position shown as its own token
    assert 5 <= len(narrow) < 30 and all(t in tokens for _, t in narrow)
    gaps = [b[0] - a[0] for a, b in zip(narrow, narrow[1:])]
    assert min(gaps) >= 13, gaps  # a 12 px label rotated by 45 degrees: no overlap
    step = tokens.index(narrow[1][1]) - tokens.index(narrow[0][1])
    assert [t for _, t in narrow] == tokens[::step]  # every n-th token


def test_the_cut_in_a_truncated_text_is_marked_on_every_token_chart():
    tokens = ["[CLS]", "a", "b", "c", "d", "[SEP]"]
    figs = [plots.token_heatmap([[0.0] * 6], tokens, ["r"], cut_after=2), plots.feature_comparison(tokens, [0.0] * 6, [1.0] * 6, cut_after=2)]
    for fig in map(validated, figs):
        (line,) = fig.layout.shapes
        assert (line.x0, line.x1, line.xref, line.yref, line.y0, line.y1) == (2.5, 2.5, "x", "paper", 0, 1)  # between token 2 and 3, across all panels
        assert "cut" in fig.layout.annotations[0].text
    assert not validated(plots.token_heatmap([[0.0] * 6], tokens, ["r"])).layout.shapes


def test_export_uses_plotlys_own_template_whatever_the_process_default(tiny_run, monkeypatch):
    """Importing Streamlit makes its placeholder template (colours #000001...) the process default;
    the dashboard's HTML report must still come out in Plotly's colours."""
    import plotly.graph_objects as go
    import plotly.io as pio

    pio.templates["placeholder"] = go.layout.Template(layout={"colorway": ["#000001", "#000002"]})
    monkeypatch.setattr(pio.templates, "default", "placeholder")
    out = export_html(tiny_run)
    assert "#000001" not in out
    assert "#636efa" in out  # plotly's first colour


def test_token_charts_drawn_one_above_the_other_share_their_plot_edges():
    """The explorer's chart and its match chart: the widest row-label margin of the two, and the
    same room for colour bars on the right, so their token columns line up (checked in a real
    browser by tests/test_browser.py); one chart alone keeps its own margins."""
    from core.plots import BAR_ROOM, align_token_charts

    main = plots.feature_comparison(["a", "b"], [0, 1], [1, 0], title="x", top=(["feature 1234 · silent"], [[1, 2]]))
    match = plots.feature_comparison(["a", "b"], [0, 1], [1, 0], title="y", row_labels=("pre-trained f1", "fine-tuned f2"))
    lefts = [main.layout.margin.l, match.layout.margin.l]
    assert lefts[0] > lefts[1]  # the longer row label needs more room
    alone = plots.feature_comparison(["a", "b"], [0, 1], [1, 0], title="y")
    align_token_charts([alone])
    assert (alone.layout.margin.l, alone.layout.margin.r) == (plots.feature_comparison(["a", "b"], [0, 1], [1, 0], title="y").layout.margin.l, 10)
    align_token_charts([main, match])
    assert main.layout.margin.l == match.layout.margin.l == max(lefts)
    assert main.layout.margin.r == match.layout.margin.r == BAR_ROOM
    go.Figure(main.to_dict())  # still a valid figure
