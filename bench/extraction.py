"""Extraction: real (non-padding) tokens/s of ``core.activations`` against the paper-style loop.

Measured: ``core.activations.extract_split`` on 1,000 IMDb reviews of the train split, both
models (pre-trained and fine-tuned stand-ins, see ``common.bench_run``), every hidden state,
writing fp16 shards exactly as the ``activations`` step does (bf16 autocast, texts sorted by
length, 8,192-token batches, only real tokens kept). Whole-call wall time: sampling the
texts, tokenising, forward passes, gathering, saving.

Baseline 1, the naive loop of the paper's published code: batches of 16 texts in data order,
``tokenizer(..., padding="max_length", max_length=512, truncation=True)``, fp32, both models with
``output_hidden_states=True``; real-token rows of every layer are gathered to fp32 CPU arrays
(it is given the benefit of writing nothing). Both see the same 1,000 reviews truncated at 512
tokens (``model.max_length=512, truncation="head"`` for the core run), so they process exactly
the same real tokens; tokens/s counts real tokens only.

Baseline 2, the bare forward passes: the same batches core plans (same order, same dynamic
padding, same bf16 autocast) through ``core.activations.hidden_states`` for both models, results
dropped, timed alternately with the core runs: the overhead figure is ``extract_split`` time / bare time - 1 (tokenising, gathering
real rows, fp16 conversion and writing shards all count as overhead).

All three run under the glibc setting ``extract_split`` uses (``core.rss.kept_heap``: large
tensors reuse freed heap pages), so the ratios compare the code, not the allocator.

Also reported (info): the same extraction with shard writing switched off (what is left is core's
own bookkeeping: sampling, tokenising, planning, copying real rows), and the extraction with the
default preset's settings (128 tokens, head+tail), as the default pipeline runs it.
"""

from __future__ import annotations

import shutil

import torch

from core.rss import kept_heap

from bench.common import Context, Section, Timing, bench_run, default_model_cfg, load_models, scratch_run, timeit


def paper_loop(models: dict, tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 512) -> int:
    """The naive extraction loop (fp32, pad to 512). Returns the number of real tokens."""
    real = 0
    with torch.no_grad(), kept_heap():  # the allocator setting extract_split runs under
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
            mask = enc["attention_mask"].bool()
            real += int(mask.sum())
            for model in models.values():
                out = model(**enc, output_hidden_states=True)
                _kept = [h[mask].numpy() for h in out.hidden_states]  # noqa: F841 - real-token rows, fp32
    return real


def bare_forward(models: dict, tokenizer, ids: list[list[int]], batch_tokens: int, compute_dtype: str, seed: int = 0) -> None:
    """The forward passes ``extract_split`` runs, on the same batches (its plan, with its default
    seed), with nothing kept."""
    from core.activations import hidden_states, plan_batches
    from core.models import pad_batch

    lengths = [len(x) for x in ids]
    with kept_heap():  # the allocator setting extract_split runs under
        for b in plan_batches(lengths, batch_tokens, seed=seed):
            input_ids, mask = pad_batch([ids[i] for i in b], tokenizer.pad_token_id)
            for model in models.values():
                hidden_states(model, input_ids, mask, compute_dtype)


def without_writes(fn) -> None:
    """Call ``fn`` with ``core.activations`` writing no shard files (measures the rest of the step)."""
    import core.activations as act

    real = act._write_shard
    act._write_shard = lambda *args: None
    try:
        fn()
    finally:
        act._write_shard = real


def run(ctx: Context) -> Section:
    from core.activations import ActivationsConfig, extract_split, sample_split
    from core.models import ModelConfig, encode

    sec = Section("extraction", __doc__.split("\n\n")[0])
    n_texts = ctx.pick(1000, 24)
    base = bench_run(ctx, ctx.pick(21000, 300))
    models, tok = load_models(base)
    out = scratch_run(base, "extraction")
    cfg = ActivationsConfig(sae_examples=n_texts)  # the step's defaults: bf16 compute, fp16 storage, 8192-token batches, 96 MB shards
    same_tokens = ModelConfig(max_length=512, truncation="head")
    texts = sample_split(base, "train", n_texts, cfg.seed)["text"].tolist()

    def clean():
        shutil.rmtree(out.activations_dir("train"), ignore_errors=True)

    index = {}

    def core_extract(model_cfg=same_tokens):
        index.update(extract_split(out, "train", n_texts, cfg, model_cfg, models, tok))

    # warm-up on a few texts (kernel selection), then the timed repeats on all of them, core and
    # bare forwards interleaved so that drifts in machine speed and allocator warm-up hit both alike
    extract_split(out, "train", min(32, n_texts), cfg, same_tokens, models, tok)
    ids = encode(tok, texts, same_tokens.max_length, same_tokens.truncation)
    core_runs, bare_runs, nowrite_runs = [], [], []
    for _ in range(ctx.repeats):
        nowrite_runs.append(timeit(lambda: without_writes(core_extract), repeats=1, warmup=0, setup=clean))
        core_runs.append(timeit(core_extract, repeats=1, warmup=0, setup=clean))  # last: its shards stay for the size below
        bare_runs.append(timeit(lambda: bare_forward(models, tok, ids, cfg.batch_tokens, cfg.compute_dtype), repeats=1, warmup=0))
    t_core, t_bare, t_nowrite = Timing.merge(core_runs), Timing.merge(bare_runs), Timing.merge(nowrite_runs)
    real_tokens = index["num_tokens"]
    assert sum(map(len, ids)) == real_tokens, "core and the bare loop must see the same tokens"
    shard_bytes = sum(p.stat().st_size for p in out.activations_dir("train").glob("*.safetensors"))

    # paper loop: expensive (every text padded to 512, fp32); one batch of warm-up, then timed passes
    paper_loop(models, tok, texts[:16])
    paper_repeats = ctx.pick(1, ctx.repeats) if n_texts >= 500 else ctx.repeats
    paper_real = {}
    t_paper = timeit(lambda: paper_real.update(n=paper_loop(models, tok, texts)), repeats=paper_repeats, warmup=0)
    assert paper_real["n"] == real_tokens, (paper_real["n"], real_tokens)

    core_tps = real_tokens / t_core.median
    paper_tps = real_tokens / t_paper.median
    bare_tps = real_tokens / t_bare.median
    sec.add("core extraction, real tokens/s (both models, all layers, shards written)", core_tps, "tok/s", paper_tps, "paper loop: pad-to-512, batch 16, fp32", target="ratio >= 6",
            note=f"{n_texts} IMDb reviews, {real_tokens:,} real tokens, truncated at 512 for both; paper loop timed {paper_repeats}x (every batch has the same [16, 512] shape)")
    sec.add("extraction time over bare forward passes", t_core.median, "s", t_bare.median, "bare bf16 forwards on the same batches", target="ratio <= 1.10",
            note="ratio - 1 is the overhead of tokenising, gathering real rows, fp16 conversion and writing shards")
    sec.add("extraction time with shard writing switched off, over bare forward passes", t_nowrite.median, "s", t_bare.median, "bare bf16 forwards on the same batches",
            note=f"everything but the disk writes of the {shard_bytes / 1e9:.2f} GB of shards: the cost of core's own bookkeeping")

    # the default preset (128 tokens head+tail), for information
    default_cfg = default_model_cfg()
    clean()
    t_default = timeit(lambda: core_extract(default_cfg), repeats=ctx.repeats, warmup=1, setup=clean)
    default_tokens = index["num_tokens"]
    clean()
    sec.add("core extraction at the default preset (128 tokens, head+tail), real tokens/s", default_tokens / t_default.median, "tok/s", paper_tps, "paper loop (512)",
            note="different truncation, hence different tokens: information only")

    sec.details = {
        "texts": n_texts,
        "real_tokens": real_tokens,
        "padded_tokens_paper_loop": 512 * len(texts),
        "padding_fraction_paper_loop": 1 - real_tokens / (512 * len(texts)),
        "core": {**t_core.as_dict(), "tokens_per_s": core_tps, "shard_bytes": shard_bytes, "settings": {"batch_tokens": cfg.batch_tokens, "compute_dtype": cfg.compute_dtype, "storage_dtype": cfg.storage_dtype, "shard_mb": cfg.shard_mb, "max_length": 512, "truncation": "head"}},
        "bare_forward": {**t_bare.as_dict(), "tokens_per_s": bare_tps},
        "paper_loop": {**t_paper.as_dict(), "tokens_per_s": paper_tps, "batch_size": 16, "max_length": 512, "dtype": "float32"},
        "overhead_fraction": t_core.median / t_bare.median - 1,
        "without_writes": {**t_nowrite.as_dict(), "overhead_fraction": t_nowrite.median / t_bare.median - 1},
        "default_preset": {**t_default.as_dict(), "real_tokens": default_tokens, "tokens_per_s": default_tokens / t_default.median},
    }
    shutil.rmtree(out.root, ignore_errors=True)
    return sec
