"""The paper's three claims checked against a run, and a one-file HTML report of the run.

``paper_claims(rows)`` turns the per-layer similarity rows of ``build_report`` into verdicts
computed from the numbers. ``export_html(run)`` writes everything the Overview and Similarity
pages show into a single self-contained HTML string (plotly.js inlined once, works offline);
every piece of text from the run is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath

import pandas as pd
import plotly.graph_objects as go

from core import plots
from core.report import build_report, collapse_note, sae_bar_misses, sae_bars_headline
from core.files import make_folder, write_text
from core.runfolder import MODEL_NAMES, RunFolder, core_command

CLAIM_MEASURES = plots.CLAIM_MEASURES  # the claims' figure draws the same two
HIGH_SIMILARITY = 0.9
SUPPORTED = "supported"
NOT_SUPPORTED = "not supported by this run"
UNKNOWN = "cannot be assessed on this run"


# ----------------------------------------------------------------------------- claims
def layer_groups(num_layers: int) -> dict[str, list[int]]:
    """Split the transformer blocks 1..L into early / middle / late thirds (embeddings excluded)."""
    blocks = list(range(1, num_layers + 1))
    k = max(1, round(num_layers / 3))
    early = blocks[:k]
    late = blocks[-k:] if num_layers > k else []
    middle = blocks[k : num_layers - k] if num_layers > 2 * k else []
    return {"early": early, "middle": middle, "late": late}


def _values(rows: Sequence[Mapping], measure: str, layers: Sequence[int]) -> list[float]:
    by_layer = {int(r["layer"]): float(r[measure]) for r in rows}
    return [by_layer[l] for l in layers if l in by_layer]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _claim(key: str, text: str, layers: list[int], verdict: str, numbers: dict, explanation: str) -> dict:
    return {"key": key, "claim": text, "layers": layers, "verdict": verdict, "supported": verdict == SUPPORTED, "numbers": numbers, "explanation": explanation}


def claim_early(rows: Sequence[Mapping], groups: dict, threshold: float) -> dict:
    """(1) Early layers stay general: every early layer keeps CKA and mean cosine >= threshold."""
    text = "Early layers stay general: the first third of the layers barely changes during fine-tuning."
    layers = groups["early"]
    if not layers:
        return _claim("early", text, layers, UNKNOWN, {}, "the model has no transformer layers to compare")
    mins = {m: min(_values(rows, m, layers)) for m in CLAIM_MEASURES}
    ok = all(v >= threshold for v in mins.values())
    detail = ", ".join(f"lowest {plots.MEASURE_LABELS[m]} {v:.3f}" for m, v in mins.items())
    explanation = f"{_span(layers)}: {detail} ({'all' if ok else 'not all'} >= {threshold:g})"
    return _claim("early", text, layers, SUPPORTED if ok else NOT_SUPPORTED, {f"min_{m}": v for m, v in mins.items()}, explanation)


def claim_middle(rows: Sequence[Mapping], groups: dict) -> dict:
    """(2) Middle layers are a transition: their mean similarity lies between the early and late means."""
    text = "Middle layers are a transition: their similarity lies between that of the early and the late layers."
    layers = groups["middle"]
    if not layers or not groups["early"] or not groups["late"]:
        return _claim("middle", text, layers, UNKNOWN, {}, "needs at least three transformer layers (early, middle and late)")
    numbers, parts, ok = {}, [], True
    for m in CLAIM_MEASURES:
        e, mid, late = (_mean(_values(rows, m, groups[g])) for g in ("early", "middle", "late"))
        numbers.update({f"early_{m}": e, f"middle_{m}": mid, f"late_{m}": late})
        ok &= e > mid > late
        parts.append(f"{plots.MEASURE_LABELS[m]}: early {e:.3f}, middle {mid:.3f}, late {late:.3f}")
    explanation = "mean per group; " + "; ".join(parts) + ("" if ok else " (not strictly decreasing)")
    return _claim("middle", text, layers, SUPPORTED if ok else NOT_SUPPORTED, numbers, explanation)


def claim_late(rows: Sequence[Mapping], groups: dict) -> dict:
    """(3) Late layers specialise: the last layer has the lowest similarity of all layers."""
    text = "Late layers specialise: the last layer changes the most (lowest similarity)."
    layers = groups["late"]
    if not layers or len(rows) < 2:
        return _claim("late", text, layers, UNKNOWN, {}, "needs at least two transformer layers")
    last = max(int(r["layer"]) for r in rows)
    numbers, parts, ok = {"last_layer": last}, [], True
    for m in CLAIM_MEASURES:
        ordered = sorted(rows, key=lambda r: int(r["layer"]))
        vals = [float(r[m]) for r in ordered]
        lowest = int(ordered[min(range(len(vals)), key=vals.__getitem__)]["layer"])
        drops = [vals[i - 1] - vals[i] for i in range(1, len(vals))]
        biggest = int(ordered[1 + max(range(len(drops)), key=drops.__getitem__)]["layer"])
        numbers.update({f"last_{m}": vals[-1], f"lowest_layer_{m}": lowest, f"largest_drop_into_{m}": biggest, f"largest_drop_{m}": max(drops)})
        ok &= lowest == last
        parts.append(f"{plots.MEASURE_LABELS[m]}: last layer {vals[-1]:.3f}, lowest at layer {lowest}, largest drop ({max(drops):.3f}) into layer {biggest}")
    return _claim("late", text, [last], SUPPORTED if ok else NOT_SUPPORTED, numbers, "; ".join(parts))


# How a claim's numbers read in a table: key prefix -> label, with {m} the measure's name.
_QUANTITY_LABELS = (
    ("min_", "lowest {m}"),
    ("early_", "{m}, early layers (mean)"),
    ("middle_", "{m}, middle layers (mean)"),
    ("late_", "{m}, late layers (mean)"),
    ("last_", "{m} at the last layer"),
    ("lowest_layer_", "layer with the lowest {m}"),
    ("largest_drop_into_", "layer after the largest {m} drop"),
    ("largest_drop_", "largest {m} drop between neighbouring layers"),
)


def quantity_label(key: str) -> str:
    """A claim number's key in words: "largest_drop_into_cka" -> "layer after the largest linear CKA drop"."""
    if key == "last_layer":
        return "last layer"
    for prefix, label in sorted(_QUANTITY_LABELS, key=lambda pl: -len(pl[0])):  # the longest prefix first
        measure = key[len(prefix) :]
        if key.startswith(prefix) and measure in plots.MEASURE_LABELS:
            return label.format(m=plots.MEASURE_LABELS[measure])
    return key.replace("_", " ")


def paper_claims(rows: Sequence[Mapping], threshold: float = HIGH_SIMILARITY) -> list[dict]:
    """The three claims with a verdict computed from per-layer similarity rows (``report["similarity"]``)."""
    num_layers = max((int(r["layer"]) for r in rows), default=0)
    groups = layer_groups(num_layers)
    claims = [claim_early(rows, groups, threshold), claim_middle(rows, groups), claim_late(rows, groups)]
    # CKA is 0/0 where a hidden state does not vary over the test tokens: no verdict can rest on it
    undefined = {m: [int(r["layer"]) for r in rows if not math.isfinite(float(r[m]))] for m in CLAIM_MEASURES}
    undefined = {m: layers for m, layers in undefined.items() if layers}
    if undefined:
        where = "; ".join(f"{plots.MEASURE_LABELS[m]} at hidden state{'s' * (len(l) > 1)} {', '.join(map(str, l))}" for m, l in undefined.items())
        why = f"not a number ({where}): a hidden state that does not vary over the test tokens has no CKA, so the similarity figures cannot confirm or refute this claim"
        claims = [{**c, "verdict": UNKNOWN, "supported": False, "numbers": {}, "explanation": why} for c in claims]
    return claims


def _span(layers: Sequence[int]) -> str:
    return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


# ----------------------------------------------------------------------------- tables
def classification_frame(per_class: Mapping[str, Mapping[str, Mapping[str, float]]]) -> pd.DataFrame:
    """Per-class precision / recall / F1 / support for both models, one row per (class, model)."""
    models = [m for m in ("pretrained", "finetuned") if m in per_class] + [m for m in per_class if m not in ("pretrained", "finetuned")]
    classes = [c for c in next(iter(per_class.values()), {}) if c not in ("accuracy", "macro avg", "weighted avg")]
    rows = []
    for name in classes:
        for model in models:
            scores = per_class[model].get(name, {})
            rows.append({"class": name, "model": model, "precision": scores.get("precision"), "recall": scores.get("recall"), "f1": scores.get("f1-score"), "support": int(scores.get("support", 0))})
    return pd.DataFrame(rows, columns=["class", "model", "precision", "recall", "f1", "support"])


SAE_COLUMNS = ("model", "layer", "architecture", "d_sae", "l0", "fvu", "dead_fraction", "accuracy_spliced", "kl_spliced", "fvu_on_finetuned", "rare_token_share", "rare_error_share", "fvu_rare_tokens", "fvu_other_tokens")
RARE_COLUMNS = {"token_share": "rare_token_share", "error_share": "rare_error_share", "fvu": "fvu_rare_tokens", "fvu_rest": "fvu_other_tokens"}


def sae_frame(saes: Sequence[Mapping]) -> pd.DataFrame:
    """SAE quality metrics (one row per SAE) with the common columns first; the rare-token split
    (``rare_tokens``, see ``core.sae_metrics``) flattened into four columns."""
    rows = [{**s, **{RARE_COLUMNS[k]: v for k, v in (s.get("rare_tokens") or {}).items() if k in RARE_COLUMNS}} for s in saes]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    first = [c for c in SAE_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in first and df[c].map(lambda v: not isinstance(v, (dict, list))).all()]
    return df[first + rest]


# What a reader sees first of the SAE table: the quality bars and drift. The rest (MSE, dense
# fraction, the rare-token split, k, token counts, hashes) made it scroll sideways at 1,024 px.
SAE_COMPACT = ("model", "layer", "architecture", "d_sae", "l0", "fvu", "dead_fraction", "accuracy_spliced", "kl_spliced", "fvu_on_finetuned")


def shown(df: pd.DataFrame) -> pd.DataFrame:
    """A table as people read it: its ``model`` column says "pre-trained" / "fine-tuned", as the
    figures do. Saved tables (CSV) keep the ids ``pretrained`` / ``finetuned`` that
    ``report --json`` and the run folder use."""
    if "model" not in df.columns:
        return df
    return df.assign(model=df["model"].map(lambda m: MODEL_NAMES.get(m, m)))


def matching_frame(matching: Sequence[Mapping]) -> pd.DataFrame:
    """Feature matching per layer: shares kept / shifted / new / lost, then the counts behind them."""
    rows = []
    for m in matching:
        row = {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
        row.update({f"{k} (count)": v for k, v in (m.get("counts") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _last_part(name: str) -> str:
    """A local path's last part (``/home/ana/models/bert`` -> ``bert``); hub ids and names as they are."""
    return PurePath(name).name or name if name.startswith(("/", "~", ".")) else name


def summary_rows(rep: Mapping, shared: bool = False) -> list[tuple[str, str]]:
    """(label, value) pairs describing the run at a glance. ``shared`` (a report sent to others):
    the run, and a model or dataset read from a local folder, by their last part only, so the
    report does not carry the author's folders."""
    names = [rep["run"], rep["base_model"], rep["dataset"]]
    if shared:
        names = [_last_part(n) for n in names]
    out = list(zip(("run", "base model", "dataset"), names))
    if rep.get("stale_steps"):  # see core.report.stale_note
        out.append(("built by an earlier method", ", ".join(rep["stale_steps"]) + " (this version may compute other figures)"))
    if "labels" in rep:
        out.append(("classes", ", ".join(map(str, rep["labels"]))))
    if "rows" in rep:
        out.append(("rows", ", ".join(f"{k} {v:,}" for k, v in rep["rows"].items())))
    if "activations" in rep:
        out.append(("activation tokens", ", ".join(f"{k} {v.get('tokens', 0):,}" for k, v in rep["activations"].items())))
    if "num_layers" in rep:
        out.append(("layers", str(rep["num_layers"])))
    if "similarity_tokens" in rep:
        out.append(("similarity evaluated on", f"{rep['similarity_tokens']:,} test tokens"))
    if "finetune" in rep:
        ft = rep["finetune"]
        out.append(("accuracy", f"pre-trained with an untrained head (chance level) {ft['accuracy_pretrained']:.3f} -> fine-tuned {ft['accuracy_finetuned']:.3f}"))
        out.append(("macro F1", f"pre-trained with an untrained head {ft['macro_f1_pretrained']:.3f} -> fine-tuned {ft['macro_f1_finetuned']:.3f}"))
    out.append(("steps done", ", ".join(rep.get("steps", {})) or "none"))
    return out


# ----------------------------------------------------------------------------- HTML
STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.3rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: right; }
th { background: #f4f4f6; } td:first-child, th:first-child { text-align: left; }
.verdict { font-weight: 600; } .supported { color: #137333; } .not-supported { color: #b3261e; } .unknown { color: #666; }
.muted { color: #666; font-size: 0.85rem; }
.wide { overflow-x: auto; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def _number(v: float) -> str:
    """Four decimals; values that would print as 0.0000 (a spliced KL of 2e-5) in scientific notation."""
    return f"{v:.2e}" if v and abs(v) < 1e-4 else f"{v:.4f}"


def _table(df: pd.DataFrame) -> str:
    """An escaped HTML table that scrolls sideways when wider than the page (the SAE table is)."""
    return '<div class="wide">' + df.to_html(index=False, escape=True, float_format=_number, border=0, na_rep="") + "</div>"


class _Figures:
    """Renders figures to HTML divs, inlining plotly.js with the first one only."""

    def __init__(self):
        self.first = True

    def __call__(self, fig) -> str:
        # Plotly's own template: a figure built in the dashboard's process (where importing
        # Streamlit makes its placeholder template the default) would otherwise come out black
        fig = go.Figure(fig).update_layout(template="plotly")
        out = fig.to_html(full_html=False, include_plotlyjs=self.first, config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}})
        self.first = False
        return out


def _claims_html(rows: Sequence[Mapping], fig, threshold: float = HIGH_SIMILARITY) -> list[str]:
    out = ["<h2>The paper's claims, checked on this run</h2>", f"<p class='muted'>'High' similarity (claim 1): CKA and mean cosine at or above {threshold:.2f}.</p>"]
    for c in paper_claims(rows, threshold):
        css = "supported" if c["verdict"] == SUPPORTED else "unknown" if c["verdict"] == UNKNOWN else "not-supported"
        out.append(f"<p><b>{_e(c['claim'])}</b><br><span class='verdict {css}'>{_e(c['verdict'])}</span> &mdash; {_e(c['explanation'])}</p>")
    groups = layer_groups(max(int(r["layer"]) for r in rows))
    out.append(fig(plots.claim_figure({"run": rows}, groups, threshold, title="CKA and mean cosine per layer, thirds shaded")))
    return out


REPORT_MARK = "<title>Layerscope report: "  # in the head of every report ``export_html`` writes


def is_report(path) -> bool:
    """Whether the file at ``path`` is a report ``export_html`` wrote (``export`` may replace those
    only). An unreadable file is not one: the caller refuses it."""
    try:
        with open(path, "rb") as f:
            return REPORT_MARK.encode() in f.read(4096)
    except OSError:
        return False


def export_html(run: RunFolder, threshold: float = HIGH_SIMILARITY) -> str:
    """One self-contained HTML report of ``run`` (works offline; all run text escaped);
    ``threshold`` is what counts as high similarity for claim 1 (the overview's slider)."""
    rep = build_report(run)
    fig = _Figures()
    name = run.name
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"{REPORT_MARK}{_e(name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Layerscope report: {_e(name)}</h1>",
        f"<p class='muted'>exported {_e(dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>",
        "<h2>Summary</h2>",
        _table(pd.DataFrame(summary_rows(rep, shared=True), columns=["", "value"])),
    ]
    if "finetune" in rep:
        per_class = rep["finetune"]["per_class"]
        parts += ["<h2>Classification report (test split)</h2>", _table(shown(classification_frame(per_class)))]
        collapsed = collapse_note(per_class.get("finetuned", {}))
        if collapsed:
            parts.append(f"<p><b>Note:</b> {_e(collapsed)}.</p>")
        for model in ("pretrained", "finetuned"):
            if model in per_class:
                name = "pre-trained + untrained head (chance)" if model == "pretrained" else "fine-tuned"
                parts.append(fig(plots.classification_bars(per_class[model], title=f"{name}: precision, recall and F1 per class")))
    if rep.get("similarity"):
        rows = rep["similarity"]
        parts += _claims_html(rows, fig, threshold)
        parts += [
            "<h2>Layer similarity, pre-trained vs fine-tuned</h2>",
            fig(plots.similarity_curves({name: rows}, plots.MEASURES, title="Every similarity measure per layer")),
            _table(plots.frame_of_similarity(rows)),
            fig(plots.cka_heatmap(rep["cka_matrix"]).update_layout(width=640)),  # square cells: full width would strand the colour bar
        ]
    if rep.get("saes"):
        table = shown(sae_frame(rep["saes"]))
        table["l0"] = table["l0"].map(lambda v: f"{v:.1f}")  # active latents per token: 32.0, not 32.0000
        parts += [
            "<h2>Sparse autoencoders (held-out tokens)</h2>",
            _table(table[[c for c in SAE_COMPACT if c in table.columns]]),
            f"<details><summary>Every column</summary>{_table(table)}</details>",
        ]
        misses = sae_bar_misses(rep["saes"])
        parts.append(f"<p>{_e(sae_bars_headline(rep['saes'], misses))}.</p>" + ("<ul>" + "".join(f"<li>{_e(m.line)}</li>" for m in misses) + "</ul>" if misses else ""))
        if any(s.get("loss_curve") for s in rep["saes"]):
            parts.append(fig(plots.sae_training_curves(rep["saes"], title="SAE training curves (inputs at unit variance; ◆ held-out FVU)")))
    if rep.get("matching"):
        parts += [
            "<h2>Feature matching, pre-trained to fine-tuned</h2>",
            fig(plots.matching_bars(rep["matching"], title="Pre-trained SAE latents kept, shifted or lost, against a seed twin")),
            _table(matching_frame(rep["matching"])),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def compare_figure(run: RunFolder, others: list[RunFolder], measures=("cosine_of_means", "cka")):
    """The similarity of ``run`` and ``others`` side by side: one panel per measure, one line per
    run, labelled with its name and dataset; on a depth-normalised axis when their depths differ."""
    from core.errors import LayerscopeError

    series, depths = {}, set()
    for r in [run, *others]:
        rep = build_report(r)
        if not rep.get("similarity"):
            raise LayerscopeError(f"{r.root} has no similarity figures yet; build it with `{core_command('build', r.root, '--until', 'similarity')}`")
        label = f"{r.name} ({rep['dataset']})"
        if label in series:  # two folders of the same name and dataset
            label = f"{r.root} ({rep['dataset']})"
        series[label] = rep["similarity"]
        depths.add(len(rep["similarity"]))
    normalise = len(depths) > 1
    return plots.similarity_by_measure(series, measures, normalise_depth=normalise, title="Layer similarity, pre-trained vs fine-tuned, run by run" + (" (depth-normalised: the models differ in depth)" if normalise else ""))


def quiet_renderer_logs() -> None:
    """Silence the browser driver under kaleido (choreographer): now and then it logs a message
    from Chromium it could not decode, with a traceback, and goes on; the PNGs are written all the
    same. A real failure still raises from ``to_image``, which ``write_figures`` names."""
    import logging

    logging.getLogger("choreographer").setLevel(logging.CRITICAL + 1)


def write_figures(run: RunFolder, out_dir, width: int = 900, height: int = 500, compare: list[RunFolder] | None = None) -> list[str]:
    """PNG files of the run's main figures (needs kaleido and a Chrome/Chromium; set BROWSER_PATH);
    with ``compare``, also ``similarity_compare.png``: this run's similarity beside theirs."""
    import os
    from pathlib import Path

    from core.errors import LayerscopeError

    if not os.environ.get("BROWSER_PATH") and os.path.exists("/usr/bin/chromium"):
        os.environ["BROWSER_PATH"] = "/usr/bin/chromium"
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise LayerscopeError("PNG export needs the 'kaleido' package and Chrome/Chromium: `pip install kaleido`; or use the dashboard's camera button") from None
    quiet_renderer_logs()
    rep = build_report(run)
    figures = {}
    if rep.get("similarity"):
        figures["similarity.png"] = plots.similarity_curves({run.name: rep["similarity"]}, plots.MEASURES, title=f"Layer similarity, pre-trained vs fine-tuned ({run.name})")
        figures["cka_matrix.png"] = plots.cka_heatmap(rep["cka_matrix"])
    if "finetune" in rep:
        figures["classification.png"] = plots.classification_bars(rep["finetune"]["per_class"]["finetuned"], title="fine-tuned: precision, recall and F1 per class")
    if any(s.get("loss_curve") for s in rep.get("saes") or []):
        figures["sae_training.png"] = plots.sae_training_curves(rep["saes"], title=f"SAE training curves ({run.name}; ◆ held-out FVU)")
    if rep.get("matching"):
        figures["matching.png"] = plots.matching_bars(rep["matching"], title=f"Pre-trained SAE latents kept, shifted or lost, against a seed twin ({run.name})")
    if compare:
        figures["similarity_compare.png"] = compare_figure(run, compare)
    if not figures:
        raise LayerscopeError(f"{run.root} has no figures to draw yet: they need the finetune and similarity steps; build them with `{core_command('build', run.root)}`")
    out = Path(out_dir)
    make_folder(out)
    written = []
    for name, figure in figures.items():
        try:
            png = figure.to_image(format="png", width=width, height=height, scale=2)
        except Exception as e:  # noqa: BLE001 - kaleido raises several types when no browser is found
            raise LayerscopeError(f"could not render {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); install Chrome/Chromium and set BROWSER_PATH") from None
        write_text(out / name, png)  # a file-system error here is the folder's, not the renderer's
        written.append(str(out / name))
    return written
