"""``python -m core report``: everything a run found, as one JSON object or readable tables.

The JSON layout is documented in README.md ("Report JSON"); the dashboard reads the same dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from core.errors import LayerscopeError
from core.runfolder import FINETUNE_METRICS_FIELDS, MODELS, SAE_METRICS_FIELDS, SAE_METRICS_FILE, RunFolder, core_command, read_json, read_similarity


def _sae_metrics(m: dict) -> dict:
    """One SAE's metrics.json as the report shows it. Runs built before every SAE was spliced
    into the fine-tuned classifier spliced pre-trained SAEs into the pre-trained model, whose
    head was never trained; their ``*_spliced_into_finetuned`` figures are what
    ``accuracy_spliced`` / ``kl_spliced`` mean now, so those are shown instead."""
    if "spliced_into" in m or "accuracy_spliced_into_finetuned" not in m:
        return m
    old = ("accuracy_spliced_into_finetuned", "kl_spliced_into_finetuned", "accuracy_original")
    kept = {k: v for k, v in m.items() if k not in old}
    return {**kept, "accuracy_spliced": m["accuracy_spliced_into_finetuned"], "kl_spliced": m.get("kl_spliced_into_finetuned"), "spliced_into": "finetuned"}


def _saved_name(cfg: dict, section: str, name: str) -> str:
    """A name from the saved config, or "unknown" where a hand edit removed it or made it no name."""
    value = cfg.get(section, {}).get(name) if isinstance(cfg.get(section), dict) else None
    return value if isinstance(value, str) and value else "unknown (not in the saved config)"


def build_report(run: RunFolder, lenient: bool = False) -> dict:
    """Everything a run found, as one JSON-ready object (``python -m core report --json``).

    A file of a finished step that is missing or damaged raises its LayerscopeError; with
    ``lenient`` (the dashboard, whose pages each need only some parts) that part is left out and
    its message kept in ``problems`` (part -> message: "finetune", "similarity", "num_layers",
    "saes", "saes_missing"), so one bad file costs only the sections that read it.
    """
    m = run.manifest()
    cfg = m["config"]  # as saved, unchecked: a report also describes a run whose settings this version would refuse
    steps = m.get("steps", {})
    rep: dict = {
        "run": str(run.root.resolve()),
        "format_version": m["format_version"],
        "base_model": _saved_name(cfg, "model", "base"),
        "dataset": _saved_name(cfg, "data", "dataset"),
        "steps": {s: {"seconds": r.get("seconds"), "peak_rss_mb": r.get("peak_rss_mb"), "finished": r.get("finished")} for s, r in steps.items()},
        "stale_steps": run.stale_steps(m),
    }
    if "data" in steps:
        rep["labels"] = steps["data"]["result"]["labels"]
        rep["rows"] = steps["data"]["result"]["rows"]
    problems: dict[str, str] = {}

    def part(name: str, read) -> None:
        try:
            rep.update(read())
        except LayerscopeError as e:
            if not lenient:
                raise
            problems[name] = str(e)

    if "finetune" in steps:
        part("finetune", lambda: _finetune_part(run))
    if "activations" in steps:
        rep["activations"] = steps["activations"]["result"]
    if "similarity" in steps:
        part("similarity", lambda: _similarity_part(run))
    if "num_layers" not in rep and "finetune" in steps:  # no similarity yet (or a damaged one): the model's own count
        part("num_layers", lambda: {"num_layers": read_json(run.model_config_path("finetuned"), {"num_hidden_layers": int})["num_hidden_layers"]})
    if "saes" in steps:
        part("saes", lambda: {"saes": [_sae_metrics(read_json(d / SAE_METRICS_FILE, SAE_METRICS_FIELDS)) for _, _, d in run.sae_dirs() if (d / SAE_METRICS_FILE).is_file()]})
        part("saes_missing", lambda: _check_saes_present(run))
    if "features" in steps:
        rep["matching"] = steps["features"]["result"].get("matching", [])
    if problems:
        rep["problems"] = problems
    return rep


def collapse_note(per_class: Mapping) -> str | None:
    """A line when the fine-tuned classifier answers (nearly) one class for every test text: it
    recalls one class whole and no other at all (a class that never appears is not counted).
    Its accuracy is then that class's share of the test split, and every SAE's spliced accuracy
    meets its bar whatever the SAE does, so both say little. None otherwise."""
    recall = {name: v["recall"] for name, v in per_class.items() if isinstance(v, dict) and v.get("support")}
    whole = [name for name, r in recall.items() if r >= 0.99]
    if len(recall) < 2 or len(whole) != 1 or any(r > 0 for name, r in recall.items() if name != whole[0]):
        return None
    return (
        f"the fine-tuned classifier recognises one class only: it recalls every test text of '{whole[0]}' and no test text of any "
        "other class, so its accuracy is about that class's share of the test split, and the SAEs' spliced accuracy, measured against it, "
        "says little; train longer (finetune.epochs), on more rows (data.max_rows), or on classes in better balance"
    )


def _whole_supports(per_class: dict) -> dict:
    """scikit-learn's report gives each class's ``support`` (a count of texts) as a float: 29.0."""
    return {k: {**v, "support": int(v["support"])} if isinstance(v, dict) and isinstance(v.get("support"), float) and v["support"].is_integer() else v for k, v in per_class.items()}


def _finetune_part(run: RunFolder) -> dict:
    fm = read_json(run.finetune_metrics_path, FINETUNE_METRICS_FIELDS)
    return {
        "models": {name: str(run.model_dir(name).resolve()) for name in MODELS},
        "finetune": {
            "accuracy_pretrained": fm["pretrained"]["accuracy"],
            "accuracy_finetuned": fm["finetuned"]["accuracy"],
            "macro_f1_pretrained": fm["pretrained"]["macro_f1"],
            "macro_f1_finetuned": fm["finetuned"]["macro_f1"],
            "per_class": {name: _whole_supports(fm[name]["per_class"]) for name in MODELS},
            "test_examples": fm["test_examples"],
            "train_examples": fm["train_examples"],
            "train_seconds": fm["train_seconds"],
        },
    }


def missing_saes(run: RunFolder) -> str | None:
    """What is wrong when an SAE the saes step recorded has no folder (or no metrics) any more, with
    the command that trains it again; None when every one is there. A report or an analysis of the
    others alone would read as the whole run."""
    result = (run.step_record("saes") or {}).get("result", {})
    recorded = [(s["model"], s["layer"]) for s in result.get("saes", []) if isinstance(s, dict) and {"model", "layer"} <= set(s)]
    present = {(m, l) for m, l, d in run.sae_dirs() if (d / SAE_METRICS_FILE).is_file()}
    gone = [(m, l) for m, l in recorded if (m, l) not in present]
    if not gone:
        return None
    missing = [f"{m} layer {l}" for m, l in gone]
    # Only those layers: a forced saes step keeps the SAEs of layers it is not asked for.
    layers = ",".join(str(l) for l in sorted({l for _, l in gone}))
    return (
        f"the saes step trained {len(recorded)} SAEs but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
        f"from {run.root / 'saes'}; train {'it' if len(missing) == 1 else 'them'} again with `{core_command('saes', run.root, '--layers', layers, '--force')}` "
        f"(both models' SAEs of {'that layer' if layers.isdigit() else 'those layers'}; the others are kept)"
    )


def _check_saes_present(run: RunFolder) -> dict:
    problem = missing_saes(run)
    if problem:
        raise LayerscopeError(problem)
    return {}


def _similarity_part(run: RunFolder) -> dict:
    sim = read_similarity(run.similarity_json)  # as core.similarity.load_similarity, without importing the step's torch code
    return {"num_layers": len(sim["layers"]) - 1, "similarity": sim["layers"], "cka_matrix": sim["cka_matrix"], "similarity_tokens": sim["num_tokens"]}


# The quality bars an SAE is held to (README "SAE quality"): past them, its features describe
# the hidden state less faithfully, and the text report and the dashboard's overview say so.
MAX_FVU = 0.20  # fraction of the variance the reconstruction misses
MAX_DEAD = 0.10  # share of latents that never fire on the test tokens
MAX_SPLICED_DROP = 0.02  # accuracy lost when the reconstruction replaces the hidden state


class BarMiss(NamedTuple):
    """One SAE below a quality bar: ``line`` names the SAE and each bar it misses, with its figures;
    ``bars`` is the set of bars missed, from ``BARS``; ``model`` is the model the SAE was trained on."""

    line: str
    bars: frozenset[str]
    model: str


BARS = ("fvu", "dead", "spliced")


def sae_bar_misses(saes: list[dict]) -> list[BarMiss]:
    """One entry per SAE that misses a quality bar, in model then layer order; [] when all pass."""
    out = []
    for s in sorted(saes, key=lambda s: (MODELS.index(s["model"]) if s.get("model") in MODELS else len(MODELS), s.get("layer", 0))):
        why = {}
        if s.get("fvu") is not None and s["fvu"] > MAX_FVU:
            why["fvu"] = f"FVU {s['fvu']:.3f} > {MAX_FVU:.2f}"
        if s.get("dead_fraction") is not None and s["dead_fraction"] > MAX_DEAD:
            why["dead"] = f"{s['dead_fraction']:.1%} of latents dead > {MAX_DEAD:.0%}"
        acc, ref = s.get("accuracy_spliced"), s.get("accuracy_original")  # both on the same splice texts
        if acc is not None and ref is not None and ref - acc > MAX_SPLICED_DROP + 1e-9:  # 0.87 - 0.85 is 0.0200...02 in floats
            why["spliced"] = f"spliced accuracy {acc:.1%}, {100 * (ref - acc):.1f} points under {ref:.1%}"
        if why:
            out.append(BarMiss(f"{s['model']} layer {s['layer']}: " + "; ".join(why.values()), frozenset(why), s["model"]))
    return out


BARS_TEXT = f"FVU at most {MAX_FVU:.2f}, at most {MAX_DEAD:.0%} of latents dead, spliced accuracy within {100 * MAX_SPLICED_DROP:.0f} points"


def sae_bars_headline(saes: list[dict], misses: list[BarMiss]) -> str:
    """The line above ``misses`` (what ``sae_bar_misses(saes)`` returned) in the text and HTML reports."""
    return f"Quality bars ({BARS_TEXT}): " + (f"{len(misses)} of {len(saes)} SAEs miss one" if misses else "every SAE meets them")


def _table(rows: list[list], header: list[str]) -> str:
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]  # also with no rows
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in cells)])


def _kl(kl: float | None) -> str:
    """Two significant digits: the spliced KL runs from about 1e-4 (last layers) to 0.1."""
    return "" if kl is None else f"{kl:#.2g}"


def _rare(r: dict | None) -> str:
    return "" if not r else f"{r['token_share']:.0%} -> {r['error_share']:.0%}"


def stale_note(run: str, stale: list[str]) -> str:
    """What to say about steps built by an earlier version of their method (``RunFolder.stale_steps``)."""
    one = len(stale) == 1
    return (
        f"step{'' if one else 's'} {', '.join(stale)} {'was' if one else 'were'} built by an earlier version of {'its method' if one else 'their methods'} than this Layerscope's, "
        f"so {'its' if one else 'their'} figures may differ from what this version computes: `{core_command('build', run, '--from', stale[0])}` redoes {'it' if one else 'them'}"
    )


def format_report(rep: dict) -> str:
    out = [f"run        {rep['run']}", f"base model {rep['base_model']}", f"dataset    {rep['dataset']}"]
    if rep.get("stale_steps"):
        out.append(f"note       {stale_note(rep['run'], rep['stale_steps'])}")
    if "rows" in rep:
        out.append("rows       " + ", ".join(f"{k} {v:,}" for k, v in rep["rows"].items()))
    if "finetune" in rep:
        ft = rep["finetune"]
        out += ["", "Fine-tuning (test split; pre-trained: the encoder with its untrained, random head, chance level)", _table(
            [["accuracy", ft["accuracy_pretrained"], ft["accuracy_finetuned"]], ["macro F1", ft["macro_f1_pretrained"], ft["macro_f1_finetuned"]]],
            ["metric", "pre-trained", "fine-tuned"],
        )]
        rows = [[name, *(ft["per_class"]["finetuned"][name][k] for k in ("precision", "recall", "f1-score")), int(ft["per_class"]["finetuned"][name]["support"])] for name in ft["per_class"]["finetuned"]]
        out += ["", "Classification report (fine-tuned)", _table(rows, ["class", "precision", "recall", "f1", "support"])]
        collapsed = collapse_note(ft["per_class"]["finetuned"])
        if collapsed:
            out.append(f"note: {collapsed}")
    if "similarity" in rep:
        rows = [[r["layer"], r["cosine_of_means"], r["mean_cosine"], r["token_cosine"], r["cka"]] for r in rep["similarity"]]
        out += ["", f"Layer similarity, pre-trained vs fine-tuned ({rep['similarity_tokens']:,} test tokens)", _table(rows, ["layer", "cos(means)", "mean cos", "token cos", "CKA"])]
    if rep.get("saes"):
        rows = [[s["model"], s["layer"], s["architecture"], s["d_sae"], f"{s['l0']:.1f}", s["fvu"], s["dead_fraction"], s.get("accuracy_spliced", float("nan")), _kl(s.get("kl_spliced")), s.get("fvu_on_finetuned", ""), _rare(s.get("rare_tokens"))] for s in rep["saes"]]
        rare = next((s["rare_tokens"]["seen_fewer_than"] for s in rep["saes"] if "seen_fewer_than" in (s.get("rare_tokens") or {})), None)
        rare_words = f"tokens seen < {rare} times in training" if rare else "tokens seldom seen in training"
        out += ["", f"Sparse autoencoders (held-out tokens; rare: {rare_words}, share of tokens -> share of error)",
                _table(rows, ["model", "layer", "arch", "d_sae", "L0", "FVU", "dead", "acc spliced", "KL spliced", "FVU on ft", "rare tok -> err"])]
        misses = sae_bar_misses(rep["saes"])
        out.append(sae_bars_headline(rep["saes"], misses))
        out += [f"  {m.line}" for m in misses]
    if rep.get("matching"):
        rows = [[m["layer"], m["kept"], m["shifted"], m["new"], m["lost"], m.get("baseline_kept", ""), m.get("baseline_lost", "")] for m in rep["matching"]]
        out += ["", "Feature matching, pre-trained -> fine-tuned (baseline: pre-trained vs a retrained seed)", _table(rows, ["layer", "kept", "shifted", "new", "lost", "base kept", "base lost"])]
    timed = [(name, st) for name, st in rep.get("steps", {}).items() if st.get("seconds") is not None]
    if timed:
        peaks = [st.get("peak_rss_mb") for _, st in timed]
        rows = [[name, f"{st['seconds']:.1f}", "" if peak is None else f"{peak:.0f}"] for (name, st), peak in zip(timed, peaks)]
        known = [peak for peak in peaks if peak is not None]
        rows.append(["total / max", f"{sum(st['seconds'] for _, st in timed):.1f}", f"{max(known):.0f}" if known else ""])
        out += ["", "Build (seconds, peak resident memory in MB)", _table(rows, ["step", "seconds", "peak RSS MB"])]
    return "\n".join(out)
