"""Growth: time and peak memory of extraction and SAE training as the token count grows.

For about 0.1M, 0.5M and 1M real tokens (``--growth-sizes``, in millions) of IMDb train
reviews with the default preset (128 tokens, head+tail): one child process runs
``core.activations.extract_split`` (both models, every hidden state, fp16 shards), a second one
trains one TopK SAE over those shards for one epoch with ``core.saes.train_one`` (default
settings, batch 2048, streamed), and the shards are deleted. Time comes from the child, peak
RSS from the child (``VmHWM``, see ``bench.memory``).

Both steps stream (one shard in memory at a time), so time should grow linearly and memory
stay flat. Figures: seconds per million tokens and peak RSS at the largest size against the
smallest size; targets (chosen here) ratio <= 1.25 for both.

Plot: ``growth.png`` next to results.json when plotly + kaleido can render offline; otherwise a
hand-written ``growth.svg``; always ``growth.md`` (a markdown table).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from bench.common import Context, Section, bench_run, default_model_cfg, scratch_run
from bench.memory import run_child
from core.files import write_text

FULL_SIZES = (0.1, 0.5, 1.0)
QUICK_SIZES = (0.002, 0.004)


def run(ctx: Context, sizes: tuple[float, ...] | None = None, plot_dir: Path | None = None) -> Section:
    from core.data import load_split
    from core.models import encode, load_tokenizer

    sec = Section("growth", __doc__.split("\n\n")[0])
    sizes = tuple(sorted(sizes or ctx.pick(FULL_SIZES, QUICK_SIZES)))
    base = bench_run(ctx, ctx.pick(21000, 300))
    train = load_split(base, "train")
    mc = default_model_cfg()
    lengths = [len(x) for x in encode(load_tokenizer(str(base.model_dir("finetuned"))), train["text"].tolist(), mc.max_length, mc.truncation)]
    mean_len = sum(lengths) / len(lengths)

    points = []
    for size in sizes:
        n = min(len(train), max(2, math.ceil(size * 1e6 / mean_len)))
        if n == len(train) and sum(lengths) < 0.9 * size * 1e6:
            sec.notes.append(f"{size}M tokens asked but the train split holds {sum(lengths):,}: capped")
        out = scratch_run(base, f"growth_{size}")
        ctx.log(f"  growth: {size}M tokens ({n} reviews) ...")
        ext = run_child("extraction", "--run", str(out.root), "--n", str(n), threads=ctx.threads)
        sae = run_child("sae", "--run", str(out.root), "--epochs", "1", threads=ctx.threads)
        shutil.rmtree(out.root, ignore_errors=True)
        points.append({
            "target_mtokens": size,
            "reviews": n,
            "tokens": ext["tokens"],
            "extraction_s": ext["seconds"],
            "extraction_rss_mb": ext["peak_rss_mb"],
            "sae_tokens": sae["tokens"],
            "sae_s": sae["seconds"],
            "sae_rss_mb": sae["peak_rss_mb"],
            "extraction_cpu_s": ext["cpu_seconds"],
            "sae_cpu_s": sae["cpu_seconds"],
        })

    small, large = points[0], points[-1]
    label = f"{large['tokens'] / 1e6:.2f}M vs {small['tokens'] / 1e6:.2f}M tokens"
    per_m = lambda p, key, tok="tokens": p[key] / p[tok] * 1e6  # noqa: E731
    sec.add(f"extraction seconds per Mtok, {label}", per_m(large, "extraction_s"), "s/Mtok", per_m(small, "extraction_s"), "same at the smallest size", target="ratio <= 1.25")
    sec.add(f"extraction peak RSS, {label}", large["extraction_rss_mb"], "MB", small["extraction_rss_mb"], "same at the smallest size", target="ratio <= 1.25")
    sec.add(f"SAE training seconds per Mtok, {label}", per_m(large, "sae_s", "sae_tokens"), "s/Mtok", per_m(small, "sae_s", "sae_tokens"), "same at the smallest size", target="ratio <= 1.25")
    sec.add(f"SAE training peak RSS, {label}", large["sae_rss_mb"], "MB", small["sae_rss_mb"], "same at the smallest size", target="ratio <= 1.25")
    sec.details = {"points": points, "mean_tokens_per_review": mean_len, "sizes_mtokens": list(sizes)}
    if plot_dir is not None:
        sec.details["plot"] = plot(points, plot_dir)
    return sec


# ----------------------------------------------------------------------------- plots
def markdown(points: list[dict]) -> str:
    rows = ["| tokens | extraction s | extraction peak RSS MB | SAE s | SAE peak RSS MB |", "|---:|---:|---:|---:|---:|"]
    for p in points:
        rows.append(f"| {p['tokens']:,} | {p['extraction_s']:.1f} | {p['extraction_rss_mb']:.0f} | {p['sae_s']:.1f} | {p['sae_rss_mb']:.0f} |")
    return "\n".join(rows) + "\n"


def plot(points: list[dict], folder: Path) -> dict:
    """growth.png via plotly + kaleido when that works offline, else growth.svg; always growth.md.

    Returns the file names (they sit next to results.json), not absolute paths."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "growth.md", markdown(points))
    try:
        return {"png": _plotly_png(points, folder / "growth.png").name, "markdown": "growth.md", "renderer": "plotly+kaleido"}
    except Exception as e:  # noqa: BLE001 - kaleido missing, no browser, ...: fall back to SVG
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    write_text(folder / "growth.svg", svg(points))
    return {"svg": "growth.svg", "markdown": "growth.md", "renderer": "hand-written SVG", "png_skipped": reason}


def _plotly_png(points: list[dict], path: Path) -> Path:
    import kaleido  # noqa: F401 - fail fast when it is not installed
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x = [p["tokens"] / 1e6 for p in points]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time (s)", "peak RSS (MB)"))
    for key, name, color in (("extraction", "extraction", "#1f77b4"), ("sae", "SAE training", "#d62728")):
        fig.add_trace(go.Scatter(x=x, y=[p[f"{key}_s"] for p in points], name=name, mode="lines+markers", line={"color": color}), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[p[f"{key}_rss_mb"] for p in points], name=name, mode="lines+markers", line={"color": color, "dash": "dot"}, showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="million tokens", rangemode="tozero")
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(width=900, height=380, margin={"l": 50, "r": 20, "t": 40, "b": 50}, template="plotly_white")
    write_text(path, fig.to_image(format="png"))
    return path


def svg(points: list[dict]) -> str:
    """Two small line charts (time, peak RSS) against million tokens, as plain SVG."""
    W, H, pad = 420, 300, 50
    colors = {"extraction": "#1f77b4", "sae": "#d62728"}
    x = [p["tokens"] / 1e6 for p in points]
    xmax = max(x) * 1.05 or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H}" font-family="sans-serif" font-size="12">', f'<rect width="{2 * W}" height="{H}" fill="white"/>']
    for panel, (suffix, title) in enumerate((("_s", "time (s)"), ("_rss_mb", "peak RSS (MB)"))):
        ox = panel * W
        ymax = max(p[f"{k}{suffix}"] for p in points for k in colors) * 1.1 or 1
        sx = lambda v: ox + pad + v / xmax * (W - 2 * pad)  # noqa: E731
        sy = lambda v: H - pad - v / ymax * (H - 2 * pad)  # noqa: E731
        parts.append(f'<text x="{ox + W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>')
        parts.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(xmax)}" y2="{sy(0)}" stroke="black"/><line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(0)}" y2="{sy(ymax)}" stroke="black"/>')
        for i in range(5):
            yv, xv = ymax * i / 4, xmax * i / 4
            parts.append(f'<text x="{sx(0) - 5}" y="{sy(yv) + 4}" text-anchor="end">{yv:.0f}</text>')
            parts.append(f'<text x="{sx(xv)}" y="{sy(0) + 16}" text-anchor="middle">{xv:.2f}</text>')
        parts.append(f'<text x="{ox + W / 2}" y="{H - 8}" text-anchor="middle">million tokens</text>')
        for k, c in colors.items():
            pts = " ".join(f"{sx(xi):.1f},{sy(p[f'{k}{suffix}']):.1f}" for xi, p in zip(x, points))
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
            parts.extend(f'<circle cx="{sx(xi):.1f}" cy="{sy(p[f"{k}{suffix}"]):.1f}" r="3" fill="{c}"/>' for xi, p in zip(x, points))
    parts.append(f'<text x="{W - 150}" y="40" fill="{colors["extraction"]}">extraction</text><text x="{W - 150}" y="56" fill="{colors["sae"]}">SAE training</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
