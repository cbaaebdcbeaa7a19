"""The benchmark suite: ``python -m bench --quick`` runs every benchmark and writes a complete results.json.

No timing is asserted anywhere: the quick mode runs on tiny inputs and its figures mean nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest

from bench.common import SECTIONS, Figure, Results, Section, Context
from bench.growth import markdown, svg
from tests.conftest import ROOT


def test_quick_run_writes_every_benchmark_with_a_baseline_and_a_ratio(tmp_path):
    out = tmp_path / "out" / "results.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["meta"]["quick"] is True
    assert res["meta"]["threads"] == 2 and res["meta"]["torch"].startswith("2.") and res["meta"]["cpu"]
    assert list(res["benchmarks"]) == list(SECTIONS)
    for name, bench in res["benchmarks"].items():
        if name == "dashboard" and not bench["figures"] and any(n.startswith("skipped:") for n in bench["notes"]):
            continue  # no Chromium / playwright on this machine
        assert bench["figures"], f"{name} has no figures: {bench['notes']}"
        for f in bench["figures"]:
            assert f["baseline_name"], (name, f["name"])
            assert math.isfinite(f["value"]) and math.isfinite(f["baseline"]) and f["baseline"] > 0, (name, f)
            assert math.isfinite(f["ratio"]), (name, f)
            assert f["passed"] in (True, False, None)
            assert (f["passed"] is None) == (f["target"] is None)
    assert (out.parent / "growth.md").is_file()
    assert (out.parent / "growth.png").is_file() or (out.parent / "growth.svg").is_file()
    assert "extraction" in proc.stdout and "ratio" in proc.stdout  # the printed table


def refused(*args: str) -> subprocess.CompletedProcess:
    """``python -m bench ARGS`` in this process, for arguments it must refuse: a refusal returns
    before the bench switches off progress bars or sets torch's threads for the process."""
    from bench.__main__ import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


@pytest.mark.parametrize(("only", "message"), [("nope", "unknown benchmark nope"), (",", "--only ',' names no benchmark")])
def test_only_rejects_unknown_names_and_an_empty_list(tmp_path, only, message):
    proc = refused("--only", only, "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [("--threads", "0", "at least 1 thread"), ("--repeats", "0", "at least once"), ("--growth-sizes", "0.1,abc", "'abc'"), ("--growth-sizes", "-1", "positive numbers")])
def test_bad_numbers_are_refused_before_any_benchmark_runs(tmp_path, flag, value, message):
    out = tmp_path / "r.json"
    proc = refused(flag, value, "--out", str(out), "--work", str(tmp_path / "w"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists() and "==" not in proc.stderr + proc.stdout  # nothing ran, nothing written


def test_bad_paths_are_refused_before_any_benchmark_runs(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (["--out", str(tmp_path / "adir")], "is not a file"),
        (["--out", str(tmp_path / "afile" / "r.json")], "a file is in the way"),
        (["--out", "/proc/layerscope-bench/r.json"], "cannot create the folder /proc/layerscope-bench"),
        (["--out", str(tmp_path / "r.json"), "--work", str(tmp_path / "afile")], "a file is in the way"),
        (["--out", str(tmp_path / "r.json"), "--growth-sizes", "inf"], "positive numbers"),
    ]
    for args, message in cases:
        proc = refused("--quick", "--only", "sae_training", *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "==" not in proc.stderr + proc.stdout, args  # refused before any benchmark ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


@pytest.mark.parametrize(
    ("target", "value", "baseline", "passed"),
    [("ratio >= 6", 60.0, 10.0, True), ("ratio >= 6", 50.0, 10.0, False), ("ratio <= 1.15", 1.1, 1.0, True), ("value <= 5", 4.0, 100.0, True), ("abs(value - baseline) <= 0.01", 0.305, 0.3, True), ("abs(value - baseline) <= 0.01", 0.32, 0.3, False), (None, 1.0, 2.0, None)],
)
def test_figure_ratio_and_target(target, value, baseline, passed):
    f = Figure("x", value, "u", baseline, "b", target=target)
    assert f.ratio == pytest.approx(value / baseline) and f.passed is passed


def test_results_table_and_json(tmp_path):
    results = Results(Context(quick=True), "python -m bench --quick")
    sec = Section("extraction", "d")
    sec.add("speed", 12.0, "tok/s", 2.0, "paper loop", target="ratio >= 6")
    results.add(sec)
    results.write(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["benchmarks"]["extraction"]["figures"][0]["ratio"] == 6.0 and data["benchmarks"]["extraction"]["figures"][0]["passed"] is True
    assert "PASS" in results.table() and "paper loop" in results.table()


def _one_section_run(name: str, value: float, quick: bool = False) -> Results:
    results = Results(Context(quick=quick), f"python -m bench --only {name}")
    sec = Section(name, "d")
    sec.add("speed", value, "tok/s", 2.0, "baseline")
    results.add(sec)
    return results


def test_partial_run_updates_its_sections_and_keeps_the_others(tmp_path):
    path = tmp_path / "r.json"
    full = _one_section_run("extraction", 12.0)
    full.add(_one_section_run("analysis", 3.0).sections["analysis"])
    full.write(path)
    _one_section_run("analysis", 5.0).write(path, merge=True)
    data = json.loads(path.read_text())
    assert [f["value"] for f in data["benchmarks"]["extraction"]["figures"]] == [12.0]  # kept
    assert [f["value"] for f in data["benchmarks"]["analysis"]["figures"]] == [5.0]  # replaced
    assert list(data["meta"]["sections_measured_again"]) == ["analysis"]
    assert data["meta"]["sections_measured_again"]["analysis"]["command"] == "python -m bench --only analysis"
    # a --quick partial run never mixes into a full file, and without merge the file is replaced
    _one_section_run("analysis", 7.0, quick=True).write(path, merge=True)
    assert json.loads(path.read_text())["meta"]["quick"] is True and list(json.loads(path.read_text())["benchmarks"]) == ["analysis"]
    path.write_text("not json")
    _one_section_run("analysis", 9.0).write(path, merge=True)  # an unreadable file is replaced, not an error
    assert json.loads(path.read_text())["benchmarks"]["analysis"]["figures"][0]["value"] == 9.0


def test_growth_svg_and_markdown():
    points = [{"tokens": t, "extraction_s": t / 1e4, "extraction_rss_mb": 900.0, "sae_s": t / 1e5, "sae_rss_mb": 700.0, "sae_tokens": t} for t in (100_000, 500_000, 1_000_000)]
    text = svg(points)
    assert text.startswith("<svg") and text.count("<polyline") == 4
    assert markdown(points).count("\n") == 5


def test_memory_child_serves_every_page_of_a_run(tiny_run):
    """The dashboard memory figure's child process: every page opened and two sentences analysed."""
    from bench.memory import run_child

    floor = run_child("dashboard_floor", "--run", str(tiny_run.root))
    served = run_child("dashboard", "--run", str(tiny_run.root))
    assert served["sentences"] == 2 and served["saes"] == len(list(tiny_run.sae_dirs())) > 0
    assert served["peak_rss_mb"] > floor["peak_rss_mb"] > 100  # loading the run and serving pages costs memory


def _outside_csv(tmp_path, also=None):
    """300 new texts, and the first 40 rows of ``also`` (texts the run already holds)."""
    import pandas as pd

    from tests.conftest import make_dataset

    csv = tmp_path / "more.csv"
    frames = [make_dataset(n=300, seed=11)] + ([pd.read_csv(also).head(40)] if also else [])
    pd.concat(frames).to_csv(csv, index=False)
    return csv


def test_sae_data_study_adds_the_texts_outside_the_run_and_scores_on_its_test_tokens(tiny_run, tiny_csv, tmp_path):
    import pandas as pd
    import torch

    from bench import sae_data
    from core.activations import ActivationStore
    from core.config import load_config
    from core.data import clean_text, load_split
    from core.models import encode, load_classifier, load_tokenizer

    csv, out = _outside_csv(tmp_path, also=tiny_csv), tmp_path / "s.json"
    argv = ["--run", str(tiny_run.root), "--model", "finetuned", "--layer", "2", "--texts", str(csv), "--extra-texts", "100000", "--out", str(out)]
    assert sae_data.main([*argv, "--settings", "0:64:2:1e-3,all:64:2:1e-3,20:64:1:1e-3"]) == 0
    res = json.loads(out.read_text())
    # the texts outside the run, found and tokenised here without the module's helpers
    cfg = load_config(base=tiny_run.manifest()["config"])
    used = set(pd.concat([load_split(tiny_run, s) for s in ("train", "val", "test")])["text"])
    pool = sorted({t for t in (clean_text(x, cfg.data) for x in pd.read_csv(csv)["text"]) if t and t not in used})
    assert 250 < len(pool) <= 300 and res["extra_texts"] == len(pool)  # the run's 40 are left out
    tok = load_tokenizer(str(tiny_run.model_dir("finetuned")))
    ids = encode(tok, pool, cfg.model.max_length, cfg.model.truncation)
    run_tokens = ActivationStore(tiny_run, "train").num_tokens
    assert res["run_tokens"] == run_tokens and res["extra_tokens"] == sum(map(len, ids))
    assert [r["tokens"] for r in res["rows"]] == [run_tokens, run_tokens + res["extra_tokens"], run_tokens + 20]
    bs = cfg.saes.training.batch_size  # full batches of a fresh shuffle each epoch
    assert [r["steps"] for r in res["rows"]] == [2 * (run_tokens // bs), 2 * ((run_tokens + res["extra_tokens"]) // bs), (run_tokens + 20) // bs]
    for r in res["rows"]:
        assert 0 <= r["fvu"] < 1.5 and 0 <= r["dead_fraction"] <= 1 and r["l0"] <= cfg.saes.k
    # the extracted states are the model's own, token for token
    model = load_classifier(str(tiny_run.model_dir("finetuned"))).eval()
    got = sae_data.extract_layer(model, tok, ids[:5], 2, "float32", torch.float32)
    with torch.no_grad():
        direct = [model.base_model(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states[2][0] for x in ids[:5]]
    torch.testing.assert_close(got, torch.cat(direct), atol=1e-5, rtol=1e-4)


def test_sae_data_study_refuses_bad_input_in_one_line(tiny_run, tiny_csv, tmp_path, capsys):
    from bench import sae_data

    base = ["--run", str(tiny_run.root), "--out", str(tmp_path / "s.json"), "--settings", "0:64:1:1e-3"]
    cases = [
        (["--layer", "9", "--texts", str(_outside_csv(tmp_path))], "not [9]"),
        (["--layer", "1"], "no texts outside the run's splits"),  # the run's own CSV: every text is in it
        (["--layer", "1", "--texts", str(tiny_csv), "--settings", "all:64"], "is not extra:latents:epochs:lr"),
        (["--run", str(tmp_path / "nothing"), "--layer", "1"], "needs step 'activations'"),
        (["--layer", "1", "--settings", "all:64:0:1e-3"], "latents, epochs and lr > 0"),
        (["--layer", "1", "--extra-texts", "0"], "extract at least 1 text"),
        (["--layer", "1", "--texts", str(tmp_path / "more.csv"), "--settings", "0:4:1:1e-3"], "fewer than the run's k = 8"),
    ]
    for extra, fragment in cases:
        assert sae_data.main([*base, *extra]) == 2
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and fragment in lines[0], (extra, lines)
    assert not (tmp_path / "s.json").exists()


def test_saelens_settings_that_fail_are_reported_and_none_left_means_no_saelens_baseline(monkeypatch):
    """SAELens present but unable to run a setting on CPU: that setting is recorded with its error
    and left out of the best; when no setting runs, there is no SAELens baseline (None)."""
    import time

    import torch

    from bench import sae_training as st

    batches = [torch.randn(64, st.D, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def stand_in(arch, batches_, autocast, sparse):  # the plain loop where the setting "runs"
        if autocast or sparse:
            raise RuntimeError("bf16 not supported on this device\nsecond line")
        return st.plain_trainer(arch, batches_)

    monkeypatch.setattr(st, "saelens_trainer", stand_in)
    def measure(make):
        make(1)()  # warm-up, as the bench does
        t0 = time.perf_counter()
        make(len(batches))()
        return {"tokens_per_s": 64 * len(batches) / (time.perf_counter() - t0)}

    timed, failed, best = st.time_saelens("topk", batches, st.SAELENS_SETTINGS["topk"], measure)
    assert best == "fp32" and list(timed) == ["fp32"] and timed["fp32"]["tokens_per_s"] > 0
    assert failed == {"bf16 autocast": "RuntimeError: bf16 not supported on this device", "fp32 sparse activations": "RuntimeError: bf16 not supported on this device"}

    only_failing = {k: v for k, v in st.SAELENS_SETTINGS["topk"].items() if k != "fp32"}
    timed, failed, best = st.time_saelens("topk", batches, only_failing, measure)
    assert best is None and timed == {} and set(failed) == set(only_failing)


@pytest.mark.parametrize("saelens_ran", [True, False])
def test_trainer_figures_target_saelens_when_it_ran_else_the_plain_loop(saelens_ran):
    from bench import sae_training as st

    entry = {"core": {"tokens_per_s": 90_000.0}, "plain": {"tokens_per_s": 30_000.0}, "saelens": {}, "saelens_best": None}
    if saelens_ran:
        entry["saelens"] = {"fp32": {"tokens_per_s": 20_000.0}, "bf16 autocast": {"tokens_per_s": 45_000.0}}
        entry["saelens_best"] = "bf16 autocast"
    sec = Section("sae_training", "d")
    st.add_trainer_figures(sec, {"topk@4096": entry}, bf16_gflops=400.0)
    by_kind = {f.name.rsplit(", ", 1)[1]: f for f in sec.figures}  # "<trainer>, <kind>"
    plain = by_kind["tokens/s vs plain loop"]
    assert plain.ratio == pytest.approx(3.0)
    ceiling = by_kind["fraction of bf16 matmul ceiling"]
    assert ceiling.value == pytest.approx(90_000 * st.flops_per_token("topk") / 1e9) and ceiling.target == "ratio >= 0.40"
    if saelens_ran:
        saelens = by_kind["tokens/s"]
        assert saelens.baseline == 45_000.0 and saelens.target == "ratio >= 3" and saelens.passed is False
        assert plain.target is None and len(sec.figures) == 3
    else:
        assert plain.target == "ratio >= 3" and plain.passed is True and len(sec.figures) == 2
