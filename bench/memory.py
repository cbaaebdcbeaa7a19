"""Memory: peak RSS of the extraction and SAE steps, of the dashboard and of the default build, and activation storage per million tokens.

Each measurement runs in its own child process (``python -m bench.memory TASK ...``), which
reports its peak resident set size as ``VmHWM`` from /proc/self/status when it ends. (The
rusage ``ru_maxrss`` of a child, from ``os.wait4`` or ``RUSAGE_CHILDREN``, is no use here: Linux
carries the parent's RSS at fork time over the exec into it, so every child would report at
least the benchmark process's own size.)

* extraction: ``core.activations.extract_split`` on 1,000 IMDb train reviews with the default
  preset (128 tokens, head+tail; bf16 compute, fp16 shards of about 96 MB). Baseline: a child
  that imports the same modules and loads both models and the tokenizer, then stops (the floor
  any extraction needs), so the ratio shows what extracting adds.
* SAE: ``core.saes.train_one`` (the ``saes`` step's training of one SAE: default TopK, batch
  2048, shards streamed from disk) for one epoch over those shards. Baseline: a child that
  imports the same modules and opens the activation store.
* dashboard: a child that serves ``checkpoints/default`` the way the Streamlit server does, run
  through Streamlit's ``AppTest`` (the same script runs and caches as the server, without a
  browser): it opens every page and types two sentences into the explorer. Baseline: a child
  that imports Streamlit and the app's modules and stops. Skipped, with a note, when the default
  run has not been built (``bash scripts/run.sh`` builds it).
* build: the peak of each step of the default run's own build, read from its manifest (the
  pipeline resets the kernel's peak counter before each step): not measured again here.
* storage: bytes of all shard files (both models, all 7 hidden states, token metadata) per
  million real tokens. Baseline: the same tensors stored as float32 (computed, not written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Context, Section, bench_run, dir_bytes, scratch_run
from core.rss import peak_rss_mb


# ----------------------------------------------------------------------------- parent side
def run_child(task: str, *args: str, threads: int = 2) -> dict:
    """Run ``python -m bench.memory TASK ARGS`` in a fresh process; its JSON result (with ``peak_rss_mb``)."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bench.memory", task, "--json", out, "--threads", str(threads), *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def run(ctx: Context) -> Section:
    from core.activations import ActivationStore
    from core.runfolder import RunFolder

    sec = Section("memory", __doc__.split("\n\n")[0])
    base = bench_run(ctx, ctx.pick(21000, 300))
    out = scratch_run(base, "memory")
    n = ctx.pick(1000, 24)
    floor = run_child("floor", "--run", str(base.root), threads=ctx.threads)
    ext = run_child("extraction", "--run", str(out.root), "--n", str(n), threads=ctx.threads)
    sae_floor = run_child("sae_floor", "--run", str(out.root), threads=ctx.threads)
    sae = run_child("sae", "--run", str(out.root), "--epochs", "1", threads=ctx.threads)

    store = ActivationStore(out, "train")
    tokens = store.num_tokens
    shard_bytes = dir_bytes(out.activations_dir("train"))
    fp32_bytes = tokens * (2 * store.num_layers * store.d_model * 4 + 13)  # 2 models; 13 B of token metadata
    shard_mb = out.hidden_shard("train", "pretrained", 0).stat().st_size / 2**20

    sec.add("extraction step, peak RSS", ext["peak_rss_mb"], "MB", floor["peak_rss_mb"], "models + tokenizer loaded, nothing extracted",
            note=f"{n} reviews, {ext['tokens']:,} tokens, {ext['shards']} shards of about {shard_mb:.0f} MB per model")
    sec.add("SAE training (one TopK SAE, streamed), peak RSS", sae["peak_rss_mb"], "MB", sae_floor["peak_rss_mb"], "modules imported, store opened",
            note=f"{sae['steps']} steps of 2048 tokens over {sae['tokens']:,} tokens")
    sec.add("activation storage per million tokens", shard_bytes / tokens * 1e6 / 1e9, "GB/Mtok", fp32_bytes / tokens * 1e6 / 1e9, "same tensors in float32",
            note="both models x 7 hidden states x 384 dims in float16 + token metadata")
    sec.details = {"floor": floor, "extraction": ext, "sae_floor": sae_floor, "sae": sae, "tokens": tokens, "shard_bytes": shard_bytes, "bytes_per_token": shard_bytes / tokens}

    default = ROOT / "checkpoints" / "default"
    if RunFolder(default).is_done("features") and not ctx.quick:
        app_floor = run_child("dashboard_floor", "--run", str(default), threads=ctx.threads)
        app = run_child("dashboard", "--run", str(default), threads=ctx.threads)
        sec.add("dashboard serving the default run, peak RSS", app["peak_rss_mb"], "MB", app_floor["peak_rss_mb"], "Streamlit and the app's modules imported",
                note=f"every page opened and {app['sentences']} sentences analysed in the explorer (Streamlit AppTest, {app['saes']} SAEs loaded)")
        steps = RunFolder(default).manifest()["steps"]
        peaks = {name: r.get("peak_rss_mb") for name, r in steps.items() if r.get("peak_rss_mb")}
        if peaks:
            top = max(peaks, key=peaks.get)
            low = min(peaks, key=peaks.get)
            sec.add("building the default run, peak RSS (its largest step)", peaks[top], "MB", peaks[low], f"its smallest step ({low})",
                    note=f"from checkpoints/default/manifest.json: {top}; per step " + ", ".join(f"{k} {v:,.0f}" for k, v in peaks.items()))
        sec.details.update(dashboard=app, dashboard_floor=app_floor, build_peaks_mb=peaks)
    else:
        sec.notes.append("the dashboard's memory is measured on checkpoints/default, which is not built here (or --quick): skipped")
    shutil.rmtree(out.root, ignore_errors=True)
    return sec


# ----------------------------------------------------------------------------- child side
def _child(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.memory")
    p.add_argument("task", choices=["floor", "extraction", "sae_floor", "sae", "dashboard_floor", "dashboard"])
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--json", required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from core.activations import ActivationsConfig, ActivationStore, extract_split
    from core.runfolder import RunFolder
    from core.saes import SAEsConfig, train_one

    from bench.common import default_model_cfg, load_models

    run = RunFolder(a.run)
    t0, c0 = time.perf_counter(), time.process_time()
    if a.task == "floor":
        load_models(run)
        result = {}
    elif a.task == "extraction":
        models, tok = load_models(run)
        t0, c0 = time.perf_counter(), time.process_time()
        idx = extract_split(run, "train", a.n, ActivationsConfig(sae_examples=a.n), default_model_cfg(), models, tok)
        result = {"tokens": idx["num_tokens"], "shards": idx["num_shards"], "examples": idx["num_examples"]}
    elif a.task in ("dashboard_floor", "dashboard"):
        result = _dashboard(a.run, serve=a.task == "dashboard")
    elif a.task == "sae_floor":
        ActivationStore(run, "train")
        result = {}
    else:
        store = ActivationStore(run, "train")
        _, hist = train_one(run, SAEsConfig(epochs=a.epochs), "pretrained", 3, store, "bert.encoder.layer.2", progress=False)
        result = {"tokens": hist["num_tokens"], "steps": hist["num_steps"], "training_tokens_per_s": hist["tokens_per_second"]}
    result["seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = time.process_time() - c0  # far below threads x seconds: other work competed for the CPU
    result["threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = peak_rss_mb()
    Path(a.json).write_text(json.dumps(result))
    return result


def _dashboard(run: str, serve: bool) -> dict:
    """Open every page of the app on ``run`` through AppTest and analyse two sentences (``serve``), or
    only import what the app imports."""
    os.environ["LAYERSCOPE_RUN"] = run
    from streamlit.testing.v1 import AppTest

    import pages._keys as keys

    if not serve:
        return {}
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    for page in ("pages/overview.py", "pages/similarity.py", "pages/features.py", "pages/explorer.py"):
        at.switch_page(page).run()
        if at.exception:
            raise RuntimeError(f"{page}: {at.exception[0].message}")
    sentences = ["the acting was wooden and the plot made no sense", "a warm, funny film with a wonderful cast; I would watch it again"]
    for text in sentences:
        at.text_input(key=keys.KEY_TEXT).input(text).run()
    from core.runfolder import RunFolder

    return {"sentences": len(sentences), "saes": len(list(RunFolder(run).sae_dirs()))}


if __name__ == "__main__":
    _child(sys.argv[1:])
