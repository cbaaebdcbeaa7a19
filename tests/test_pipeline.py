"""Steps, resumability, the manifest and the report on the tiny run."""

import itertools
import json

import numpy as np
import pytest
import torch

from core.config import load_config
from core.errors import LayerscopeError
from core.pipeline import build, run_step
from core.report import build_report, format_report
from core.runfolder import FORMAT_VERSION, RunFolder
from tests.conftest import needs_kept_heap, tiny_overrides


def _cfg(tiny_model, tiny_csv, **extra):
    return load_config(preset="tiny", overrides={**tiny_overrides(tiny_model, tiny_csv), **extra})


def test_manifest_records_everything(tiny_run):
    m = tiny_run.manifest()
    assert m["format_version"] == FORMAT_VERSION
    assert {"data", "finetune", "activations", "similarity"} <= set(m["steps"])
    import importlib.metadata
    import platform

    import core

    assert m["packages"]["torch"] == torch.__version__ and m["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert m["packages"]["python"] == platform.python_version() and m["packages"]["layerscope"] == core.__version__
    assert m["config"]["data"]["seed"] == 0 and m["config"]["finetune"]["seed"] == 0
    assert all(r["seconds"] >= 0 and len(r["config_hash"]) == 16 for r in m["steps"].values())
    assert set(m["steps"]["data"]["result"]["hashes"]) == {"train", "val", "test"}
    # every step's own peak memory: reset before it starts, so the earlier steps' peaks do not leak in
    assert all(r["peak_rss_scope"] == "step" and r["peak_rss_mb"] > 50 for r in m["steps"].values())


def test_each_step_reports_its_own_peak_memory(tmp_path, tiny_model, tiny_csv, monkeypatch):
    import core.pipeline as pipeline
    from core.rss import peak_rss_mb, release_free_memory, reset_peak_rss

    real = pipeline._step_fn

    def data_step_plus_300_mb(run, cfg, redo):
        x = torch.ones(300 * 2**20 // 4)  # 300 MiB, written, so resident
        del x
        return real("data")(run, cfg, redo)

    monkeypatch.setattr(pipeline, "_step_fn", lambda step: data_step_plus_300_mb if step == "data" else real(step))
    release_free_memory()  # as the pipeline does before each step, so `start` is the size the step starts from
    assert reset_peak_rss()
    start = peak_rss_mb()
    run = RunFolder(tmp_path / "r")
    build(run, _cfg(tiny_model, tiny_csv), until="finetune", log=lambda *_: None)
    steps = run.manifest()["steps"]
    assert steps["data"]["peak_rss_mb"] >= start + 250  # sees its 300 MiB
    assert steps["finetune"]["peak_rss_mb"] < steps["data"]["peak_rss_mb"] - 200  # does not inherit them
    text = format_report(build_report(run))
    assert "peak RSS MB" in text and f"{steps['data']['peak_rss_mb']:.0f}" in text


def test_report_json_has_documented_fields(tiny_run):
    rep = build_report(tiny_run)
    assert json.loads(json.dumps(rep)) == rep
    for key in ("run", "base_model", "dataset", "num_layers", "models", "finetune", "similarity"):
        assert key in rep
    assert rep["num_layers"] == 2 and [r["layer"] for r in rep["similarity"]] == [0, 1, 2]
    assert set(rep["models"]) == {"pretrained", "finetuned"}
    assert {"accuracy_pretrained", "accuracy_finetuned", "macro_f1_finetuned", "per_class"} <= set(rep["finetune"])
    for row in rep["similarity"]:
        assert {"cosine_of_means", "mean_cosine", "cka"} <= set(row)
    text = format_report(rep)
    assert "Layer similarity" in text and "Classification report" in text
    supports = [v["support"] for m in rep["finetune"]["per_class"].values() for v in m.values() if isinstance(v, dict) and "support" in v]
    assert supports and all(type(n) is int for n in supports)  # counts of texts, not scikit-learn's 29.0
    sae_rows = text[text.index("Sparse autoencoders") :].splitlines()[3 : 3 + len(rep["saes"])]
    assert all(f" {s['l0']:.1f} " in row and f"{s['l0']:.4f}" not in row for s, row in zip(rep["saes"], sae_rows))
    header = text[text.index("Sparse autoencoders") :].splitlines()[1].split("  ")
    kl_column = [h.strip() for h in header if h.strip()].index("KL spliced")
    for s, row in zip(rep["saes"], sae_rows):  # the spliced KL to two significant digits, in its own column
        assert row.split()[kl_column] == f"{s['kl_spliced']:#.2g}" and float(row.split()[kl_column]) == pytest.approx(s["kl_spliced"], rel=0.05)
    for s in rep["saes"]:  # the rare-token split, as fractions, and its column in the text
        r = s["rare_tokens"]
        assert 0 <= r["token_share"] <= 1 and 0 <= r["error_share"] <= 1 and r["seen_fewer_than"] == 50
        assert f"{r['token_share']:.0%} -> {r['error_share']:.0%}" in text


def test_a_step_built_by_an_earlier_version_of_its_method_is_named_with_the_command_that_redoes_it(tmp_path, tiny_run, monkeypatch):
    """Each step records the version of its method; once this code's version is higher (its step
    now computes other figures for the same settings), report and build name the step and how to
    redo it, and redoing it clears the note. Records from before the numbering count as version 1."""
    import shutil

    from core.config import saved_config
    from core.runfolder import STEP_METHODS

    run = RunFolder(tmp_path / "copy")
    shutil.copytree(tiny_run.root, run.root)
    assert {r["method"] for r in run.manifest()["steps"].values()} == {1} and run.stale_steps() == []
    m = run.manifest()
    del m["steps"]["data"]["method"]  # a run built before steps recorded their method
    run.write_manifest(m)
    assert run.stale_steps() == [] and build_report(run)["stale_steps"] == []
    monkeypatch.setitem(STEP_METHODS, "similarity", 2)
    assert run.stale_steps() == ["similarity"]
    rep = build_report(run)
    assert rep["stale_steps"] == ["similarity"]
    assert f"step similarity was built by an earlier version of its method than this Layerscope's, so its figures may differ from what this version computes: `python -m core build --run {run.root} --from similarity` redoes it" in format_report(rep)
    from core.export import export_html

    assert "<td>built by an earlier method</td>\n      <td>similarity (this version may compute other figures)</td>" in export_html(run)
    lines = []
    build(run, saved_config(run), log=lines.append)  # every step done: skipped, the stale one named
    assert [l for l in lines if "earlier version" in l] == [f"[similarity] already done in {run.root}, by an earlier version of its method than this Layerscope's: `python -m core build --run {run.root} --from similarity` redoes it"]
    assert run_step(run, "similarity", saved_config(run), redo=True, log=lambda *_: None) == "done"
    assert run.manifest()["steps"]["similarity"]["method"] == 2 and run.stale_steps() == []


def test_finished_steps_are_skipped_and_changed_settings_need_force(tmp_path, tiny_model, tiny_csv):
    run = RunFolder(tmp_path / "r")
    cfg = _cfg(tiny_model, tiny_csv)
    timings = build(run, cfg, until="data", log=lambda *_: None)
    assert list(timings) == ["data"]  # only the step asked for ran, and it ran now
    assert isinstance(timings["data"], float) and timings["data"] >= 0  # its seconds
    before = run.split_csv("train").read_bytes()
    assert run_step(run, "data", cfg, log=lambda *_: None) == "skipped"
    changed = _cfg(tiny_model, tiny_csv, **{"data.seed": 7})
    with pytest.raises(LayerscopeError, match="--force"):
        run_step(run, "data", changed, log=lambda *_: None)
    assert run.split_csv("train").read_bytes() == before  # nothing touched
    assert run_step(run, "data", changed, force=True, log=lambda *_: None) == "done"
    assert run.split_csv("train").read_bytes() != before


def test_step_before_its_input_is_refused(tmp_path, tiny_model, tiny_csv):
    run = RunFolder(tmp_path / "r")
    with pytest.raises(LayerscopeError, match="needs step 'data'"):
        run_step(run, "finetune", _cfg(tiny_model, tiny_csv), log=lambda *_: None)
    assert not run.root.exists()  # refused before a run folder was made


def test_a_first_step_that_fails_leaves_no_run_folder(tmp_path, tiny_model, tiny_csv):
    run = RunFolder(tmp_path / "r")
    with pytest.raises(LayerscopeError, match="unknown dataset 'imbd'"):
        build(run, _cfg(tiny_model, tiny_csv, **{"data.dataset": "imbd"}), log=lambda *_: None)
    assert not run.root.exists()


def test_incompatible_run_folder(tmp_path):
    run = RunFolder(tmp_path / "old")
    run.root.mkdir()
    run.manifest_path.write_text(json.dumps({"format_version": 0, "config": {}, "steps": {}}))
    with pytest.raises(LayerscopeError, match="run format 0"):
        build_report(run)


def test_interrupted_step_leaves_nothing_half_written(tmp_path, tiny_model, tiny_csv, monkeypatch):
    import core.activations as act

    run = RunFolder(tmp_path / "r")
    cfg = _cfg(tiny_model, tiny_csv)
    build(run, cfg, until="finetune", log=lambda *_: None)
    calls = {"n": 0}
    real = act.save_file

    def failing_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 4:
            real(tensors, path)  # bytes on disk under the temporary name...
            raise KeyboardInterrupt  # ...then the user presses Ctrl-C
        real(tensors, path)

    monkeypatch.setattr(act, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        run_step(run, "activations", cfg, log=lambda *_: None)
    assert not list(run.root.rglob("*.tmp"))
    assert not run.is_done("activations")
    monkeypatch.setattr(act, "save_file", real)
    assert run_step(run, "activations", cfg, log=lambda *_: None) == "done"


def test_interrupted_forced_redo_leaves_the_step_and_later_ones_not_done(tmp_path, tiny_model, tiny_csv, monkeypatch):
    import core.activations as act

    run = RunFolder(tmp_path / "r")
    cfg = _cfg(tiny_model, tiny_csv)
    build(run, cfg, until="similarity", log=lambda *_: None)
    assert run.is_done("activations") and run.is_done("similarity")
    calls = {"n": 0}
    real = act.save_file

    def interrupted_after_two_shards(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(tensors, path)

    monkeypatch.setattr(act, "save_file", interrupted_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        run_step(run, "activations", cfg, force=True, redo=True, log=lambda *_: None)
    # some shards are new, the rest old: the manifest must not call either step done
    assert not run.is_done("activations") and not run.is_done("similarity")
    assert run.is_done("finetune")
    monkeypatch.setattr(act, "save_file", real)
    assert build(run, cfg, log=lambda *_: None).keys() >= {"activations", "similarity"}
    assert run.is_done("activations") and run.is_done("similarity")


def test_activation_shards_trace_back_to_text(tiny_run):
    from core.activations import ActivationStore
    from core.data import load_split
    from core.models import encode, load_tokenizer
    from transformers import AutoModel

    store = ActivationStore(tiny_run, "test")
    assert store.index["num_shards"] > 1  # tiny shards: streaming is exercised
    meta = store.all_meta()
    frame = load_split(tiny_run, "test").set_index("id")
    tok = load_tokenizer(str(tiny_run.model_dir("finetuned")))
    cfg = tiny_run.manifest()["config"]["model"]
    # every example appears with exactly its tokens, [CLS]/[SEP] marked, no padding
    assert meta["example_ids"].unique().numel() == len(frame)
    assert int(meta["special"].sum()) == 2 * len(frame)
    assert not (meta["token_ids"] == tok.pad_token_id).any()
    # every example's rows hold its tokens in order and equal a direct forward of that text alone
    model = AutoModel.from_pretrained(str(tiny_run.model_dir("finetuned"))).eval()
    layers = [store.load_layer("finetuned", layer) for layer in range(store.num_layers)]
    for ex in meta["example_ids"].unique().tolist():
        rows = meta["example_ids"] == ex
        ids = encode(tok, [frame.loc[ex, "text"]], cfg["max_length"], cfg["truncation"])[0]
        assert meta["token_ids"][rows].tolist() == ids
        assert meta["positions"][rows].tolist() == list(range(len(ids)))
        with torch.no_grad():
            direct = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer, stored in enumerate(layers):
            np.testing.assert_allclose(stored[rows].numpy(), direct[layer][0].numpy(), atol=1e-4)


def test_seeded_plan_mixes_texts_stored_by_class_and_pads_no_more():
    """Texts stored by class and truncated to one length (as IMDb at 128 tokens) must not reach
    the shards, which the SAE trainer streams one at a time, grouped by class."""
    from core.activations import plan_batches, plan_shards

    lengths = [128] * 400 + [40 + i for i in range(40)]  # texts 0-199 of one class, 200-399 of the other, then short ones
    first_class = lambda b: np.asarray(b) < 200  # noqa: E731
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
    plain, mixed = plan_batches(lengths, 1024), plan_batches(lengths, 1024, seed=0)
    assert sorted(np.concatenate(mixed).tolist()) == list(range(len(lengths)))  # every text once
    assert padded(mixed) == padded(plain) and len(mixed) == len(plain)  # the same lengths batched together
    assert all(len({lengths[i] for i in b}) == 1 for b in mixed if lengths[b[0]] == 128)
    both = lambda batches: [first_class(b).any() and not first_class(b).all() for b in batches if lengths[b[0]] == 128]  # noqa: E731
    assert sum(both(plain)) <= 1  # unseeded: one class per batch, but for the one batch across the boundary
    assert np.mean(both(mixed)) > 0.9  # seeded: nearly every batch holds both
    long_texts = [t[t < 400] for t in (np.concatenate(s) for s in plan_shards(mixed, lengths, 8192))]
    shares = [first_class(t).mean() for t in long_texts if len(t) >= 32]
    assert len(shares) >= 5 and all(0.25 < x < 0.75 for x in shares), shares  # and so does every shard
    assert [max(lengths[i] for i in b) for b in mixed] != sorted((max(lengths[i] for i in b) for b in mixed), reverse=True)
    again = plan_batches(lengths, 1024, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(mixed, again))  # seeded: the same plan every time


def test_batches_stream_every_token_once_per_epoch(tiny_run):
    from core.activations import ActivationStore

    store = ActivationStore(tiny_run, "train")
    batches = list(store.iter_batches("pretrained", 1, 64, epochs=1.0, seed=0))
    assert all(b.shape == (64, store.d_model) for b in batches)
    assert len(batches) == store.num_tokens // 64 == store.num_batches(64)
    seen = torch.cat(batches)
    everything = store.load_layer("pretrained", 1)
    # each yielded row is a real stored row, and no row is repeated within the epoch
    assert torch.unique(seen, dim=0).shape[0] == seen.shape[0]
    assert torch.isin(seen[:, 0], everything[:, 0]).all()


@pytest.mark.parametrize("stored", ["float32", "float16"])
def test_batches_equal_a_float32_shuffle_of_the_shards(tmp_path, tiny_run, stored):
    """Shuffling rows in the stored dtype and converting batch by batch yields what shuffling float32 copies would."""
    import shutil

    from safetensors.torch import load_file, save_file

    from core.activations import ActivationStore

    run = tiny_run
    if stored == "float16":  # the tiny run stores float32; the default stores float16
        run = RunFolder(tmp_path / "r")
        shutil.copytree(tiny_run.root, run.root, ignore=shutil.ignore_patterns("saes", "features"))
        for s in range(ActivationStore(run, "train").index["num_shards"]):
            path = run.hidden_shard("train", "finetuned", s)
            save_file({k: v.half() for k, v in load_file(path).items()}, str(path))
    store = ActivationStore(run, "train")
    got = list(store.iter_batches("finetuned", 2, 48, epochs=2.0, seed=3))  # 48 leaves rows over at each shard
    gen = torch.Generator().manual_seed(3)
    want, leftover = [], torch.empty(0, store.d_model)
    while len(want) < len(got):
        for s in torch.randperm(store.index["num_shards"], generator=gen).tolist():
            x = torch.cat([leftover, store.layer("finetuned", s, 2).float()])
            x = x[torch.randperm(len(x), generator=gen)]
            full = len(x) // 48 * 48
            want += list(x[:full].split(48))
            leftover = x[full:]
    assert store.layer("finetuned", 0, 2).dtype == getattr(torch, stored)
    assert len(got) == store.num_batches(48, epochs=2.0)
    assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))
    if stored == "float16":  # each batch owns its float32 rows: no whole-shard float32 copy is made and kept alive
        assert all(g.untyped_storage().nbytes() == g.numel() * 4 for g in got)


def test_train_layers_keep_only_the_chosen_hidden_states(tmp_path, tiny_run):
    """``activations.train_layers``: the shards hold those layers only, equal to a full extraction's."""
    import shutil

    from core.activations import ActivationsConfig, ActivationStore, extract_split
    from core.config import load_config
    from core.models import load_classifier, load_tokenizer
    from core.saes import run_saes

    cfg = load_config(base=tiny_run.manifest()["config"])
    run = RunFolder(tmp_path / "r")
    shutil.copytree(tiny_run.root, run.root, ignore=shutil.ignore_patterns("activations", "saes", "features"))
    tok = load_tokenizer(str(run.model_dir("finetuned")))
    models = {m: load_classifier(str(run.model_dir(m))).eval() for m in ("pretrained", "finetuned")}
    act_cfg = ActivationsConfig(**{**cfg.activations.__dict__, "train_layers": [2, 0]})
    index = extract_split(run, "train", 0, act_cfg, cfg.model, models, tok, layers=act_cfg.train_layers)
    assert index["layers"] == [0, 2]
    part, full = ActivationStore(run, "train"), ActivationStore(tiny_run, "train")
    assert part.layers == [0, 2] and full.layers == [0, 1, 2]
    for layer in (0, 2):
        torch.testing.assert_close(part.load_layer("finetuned", layer), full.load_layer("finetuned", layer))
    with pytest.raises(LayerscopeError, match=r"hold hidden states \[0, 2\] only, not \[1\].*train_layers"):
        part.load_layer("pretrained", 1)
    # the SAE step asks for layers 1..2 and stops before training anything
    shutil.copytree(tiny_run.activations_dir("test"), run.activations_dir("test"))
    with pytest.raises(LayerscopeError, match=r"not \[1\]"):
        run_saes(run, cfg.saes, cfg.model, progress=False)
    assert not run.sae_dir("pretrained", 2).exists()
    with pytest.raises(LayerscopeError, match=r"has \[3\], but this model has hidden states 0..2"):
        extract_split(run, "train", 0, act_cfg, cfg.model, models, tok, layers=[1, 3])


@needs_kept_heap
def test_extraction_runs_with_freed_heap_kept_and_restores_glibc_after(tmp_path, tiny_run, monkeypatch):
    """``extract_split`` runs its batches under ``core.rss.kept_heap`` and leaves it when done."""
    import shutil

    from core import activations, rss
    from core.config import load_config
    from core.models import load_classifier, load_tokenizer

    for name in (*rss._GLIBC_ENV, rss.OPT_OUT):
        monkeypatch.delenv(name, raising=False)
    seen = []
    shard = activations._extract_shard
    monkeypatch.setattr(activations, "_extract_shard", lambda *a, **k: seen.append(rss._on) or shard(*a, **k))
    cfg = load_config(base=tiny_run.manifest()["config"])
    run = RunFolder(tmp_path / "r")
    shutil.copytree(tiny_run.root, run.root, ignore=shutil.ignore_patterns("activations", "saes", "features"))
    tok = load_tokenizer(str(run.model_dir("finetuned")))
    models = {m: load_classifier(str(run.model_dir(m))).eval() for m in ("pretrained", "finetuned")}
    activations.extract_split(run, "test", 0, cfg.activations, cfg.model, models, tok)
    assert seen and all(seen)
    assert rss._on is False and rss._depth == 0


def test_options_added_later_leave_old_step_hashes_alone():
    """A field marked hash_when_set changes a step's hash only when it is set."""
    import dataclasses
    import hashlib

    cfg = load_config()
    old = {k: v for k, v in dataclasses.asdict(cfg.activations).items() if k != "train_layers"}
    blob = json.dumps({"model": dataclasses.asdict(cfg.model), "activations": old}, sort_keys=True)
    assert cfg.section_hash("model", "activations") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    chosen = load_config(overrides={"activations.train_layers": "1,2"})
    assert chosen.activations.train_layers == [1, 2]
    assert chosen.section_hash("model", "activations") != cfg.section_hash("model", "activations")


def test_every_file_of_a_run_gets_ordinary_permissions(tiny_run):
    """Model weights, shards and feature statistics too (safetensors alone writes them 0600)."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    files = [p for p in tiny_run.root.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "stats.safetensors" for p in files)
    wrong = [str(p.relative_to(tiny_run.root)) for p in files if p.stat().st_mode & 0o777 != 0o666 & ~umask]
    assert not wrong, wrong


def test_disk_estimate_equals_the_bytes_extraction_writes(tiny_run):
    """``split_bytes`` from the index's token counts against the sizes of the shard files on disk:
    equal but for each file's JSON header."""
    from core.activations import split_bytes

    for split in ("train", "test"):
        index = json.loads(tiny_run.activation_index(split).read_text())
        estimate = split_bytes(index["num_tokens"], len(index["layers"]), index["d_model"], index["storage_dtype"])
        files = list(tiny_run.activations_dir(split).glob("*.safetensors"))
        written = sum(p.stat().st_size for p in files)
        assert estimate <= written <= estimate + 2048 * len(files), (split, estimate, written)


def test_an_extraction_the_disk_cannot_hold_is_refused_before_it_writes(tmp_path, tiny_run, monkeypatch, capsys):
    """One line that names both sizes and the options that write less; the run's older shards and
    its manifest stay as they were, and the same command goes through once there is room."""
    import shutil
    from collections import namedtuple

    from core import activations
    from core.__main__ import main

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    Usage = namedtuple("Usage", "total used free")
    full = Usage(10**12, 10**12 - 10**6, 10**6)  # 1 MB free
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda path: full)
    assert main(["activations", "--run", str(run), "--force"]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, lines
    for fragment in ("not enough disk space for the activations", "1 MB free", "of older shards they replace", "activations.sae_examples", "activations.train_layers", "larger disk"):
        assert fragment in lines[0], lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    monkeypatch.setattr(activations.shutil, "disk_usage", lambda path: Usage(10**12, 0, 10**12))
    assert main(["activations", "--run", str(run), "--force"]) == 0


def test_the_disk_check_counts_what_is_there_to_replace(tmp_path, monkeypatch):
    from collections import namedtuple

    from core import activations
    from core.activations import SHARD_HEADROOM, check_disk_space

    free = 10**9
    seen = []
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda path: seen.append(path) or namedtuple("Usage", "total used free")(2 * free, free, free))
    folder = tmp_path / "activations"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "old.safetensors").write_bytes(b"x" * 5000)
    check_disk_space(folder, {"train": free + 5000 - SHARD_HEADROOM}, "hint")  # fits, with the old shard's bytes
    with pytest.raises(LayerscopeError, match=r"not enough disk space.*\+5 KB of older shards.*hint$"):
        check_disk_space(folder, {"train": free + 5001 - SHARD_HEADROOM}, "hint")
    check_disk_space(tmp_path / "not" / "there", {"train": 1}, "hint")  # a folder not made yet: its nearest parent's disk
    assert seen[-1] == tmp_path


def test_sae_quality_bars_name_each_sae_and_each_bar_it_misses():
    from core.report import sae_bar_misses

    def sae(model, layer, fvu=0.1, dead=0.0, acc=0.86, ref=0.87):
        return {"model": model, "layer": layer, "fvu": fvu, "dead_fraction": dead, "accuracy_spliced": acc, "accuracy_original": ref}

    saes = [
        sae("finetuned", 6, dead=0.125),
        sae("pretrained", 6, fvu=0.2659),
        sae("pretrained", 3, fvu=0.20, dead=0.10, acc=0.85),  # every figure exactly on its bar: passes
        sae("pretrained", 4, fvu=0.31, acc=0.80),
    ]
    assert sae_bar_misses(saes) == [
        ("pretrained layer 4: FVU 0.310 > 0.20; spliced accuracy 80.0%, 7.0 points under 87.0%", {"fvu", "spliced"}, "pretrained"),
        ("pretrained layer 6: FVU 0.266 > 0.20", {"fvu"}, "pretrained"),
        ("finetuned layer 6: 12.5% of latents dead > 10%", {"dead"}, "finetuned"),
    ]
    assert sae_bar_misses([sae("pretrained", 1), {"model": "finetuned", "layer": 2, "fvu": 0.05}]) == []  # a run without splicing


def test_the_text_report_lists_the_saes_below_the_bars(tiny_run):
    """The misses are worked out here from each SAE's metrics.json with the documented bars (README
    "SAE quality": FVU above 0.20, more than 10% of latents dead, spliced accuracy more than 2
    points under the original), not with the function that writes the lines."""
    rep = build_report(tiny_run)
    text = format_report(rep)
    expected = {}  # (model, layer) -> the figures each missed bar is reported with
    for _, _, folder in tiny_run.sae_dirs():
        s = json.loads((folder / "metrics.json").read_text())
        why = []
        if s["fvu"] > 0.20:
            why.append(f"FVU {s['fvu']:.3f} > 0.20")
        if s["dead_fraction"] > 0.10:
            why.append(f"{s['dead_fraction']:.1%} of latents dead > 10%")
        if s["accuracy_original"] - s["accuracy_spliced"] > 0.02 + 1e-9:
            why.append(f"spliced accuracy {s['accuracy_spliced']:.1%}")
        if why:
            expected[(s["model"], s["layer"])] = why
    assert expected, "the tiny run's SAEs are expected to miss a bar, so the listing is exercised"
    n_saes = len(list(tiny_run.sae_dirs()))
    assert n_saes == len(rep["saes"])
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Quality bars ("))
    assert lines[at].endswith(f": {len(expected)} of {n_saes} SAEs miss one")
    listed = list(itertools.takewhile(lambda line: line.startswith("  "), lines[at + 1:]))  # the lines under the headline
    assert [line.split(": ")[0] for line in listed] == [f"  {model} layer {layer}" for model, layer in expected]  # model, then layer order
    for line, why in zip(listed, expected.values()):
        assert all(w in line for w in why) and line.count("; ") == len(why) - 1, (line, why)
    assert "every SAE meets them" not in text


def test_a_classifier_that_recognises_one_class_only_is_named():
    """From scikit-learn's own report of hand-made predictions: one class recalled whole and no
    other at all is named (the default run's accuracy bar and the SAEs' spliced accuracy say
    little then); a classifier that gets any text of a second class right is not."""
    from sklearn.metrics import classification_report

    from core.report import collapse_note

    names = ["1 star", "3 stars", "5 stars"]

    def report(y_true, y_pred):
        rep = classification_report(y_true, y_pred, labels=[0, 1, 2], target_names=names, output_dict=True, zero_division=0)
        return {n: rep[n] for n in names}  # what the finetune step keeps of it: the classes

    y = [0, 0, 1, 1, 2, 2, 2, 2]
    note = collapse_note(report(y, [2] * 8))
    assert note and "recalls every test text of '5 stars' and no test text of any other class" in note
    assert collapse_note(report(y, [1, 1, 0, 0, 2, 2, 2, 2])) is not None  # the other classes swapped: still none of them right
    assert collapse_note(report(y, [0, 2, 2, 2, 2, 2, 2, 2])) is None  # one '1 star' text right
    assert collapse_note(report(y, [0, 0, 1, 1, 2, 2, 2, 2])) is None
    assert collapse_note(report([2, 2, 2], [2, 2, 2])) is None  # a test split of one class: nothing to collapse from
