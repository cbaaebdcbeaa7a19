"""Fine-tuning: training examples/s of ``core.finetune``'s settings against ``Trainer`` defaults.

Both train the embedded MiniLM classifier with the transformers ``Trainer`` on the same 256
IMDb train reviews (128 tokens, head+tail, batch 16, one epoch = 16 optimiser steps), with
``DataCollatorWithPadding`` (dynamic padding). Each is timed over ``trainer.train()``
(fresh model and Trainer per repeat, built outside the timing, one short warm-up run first).

* measured: ``core.finetune._training_args`` (bf16 autocast where the CPU has it, length-grouped
  batches, AdamW with warm-up) and a model loaded with ``attention_probs_dropout_prob=0`` and the
  training attention kernel of ``core.finetune.training_attention`` (eager on CPU), as
  ``run_finetune`` does;
* baseline: ``TrainingArguments`` with default settings (fp32, random sampler, default
  dropout) apart from the same batch size, epochs and seed, and no checkpoint saving.

Accuracy (within 1 point of the baseline recipe) needs both recipes trained on a full split:
the ``finetune_accuracy`` benchmark does that.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench.common import BASE_MODEL, Context, Section, bench_run, timeit


def run(ctx: Context) -> Section:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from core.data import load_split
    from core.finetune import FinetuneConfig, _Encoded, _training_args, bf16_supported, training_attention
    from core.models import ModelConfig, encode, load_classifier, load_tokenizer

    hf_logging.set_verbosity_error()
    sec = Section("finetune", __doc__.split("\n\n")[0])
    base = bench_run(ctx, ctx.pick(21000, 300))
    n = ctx.pick(256, 32)
    frame = load_split(base, "train").sample(n=n, random_state=0).sort_values("id")
    names = base.labels()
    tok = load_tokenizer(BASE_MODEL)
    mc = ModelConfig(max_length=128, truncation="head_tail")
    ids = encode(tok, frame["text"].tolist(), mc.max_length, mc.truncation)
    labels = frame["label"].tolist()
    collator = DataCollatorWithPadding(tok)
    cfg = FinetuneConfig(epochs=1, batch_size=16)
    use_bf16 = cfg.bf16 and bf16_supported()
    tmp = Path(tempfile.mkdtemp(prefix="finetune_", dir=ctx.work))

    def make(recipe: str, count: int):
        dataset = _Encoded(ids[:count], labels[:count])
        if recipe == "core":
            model = load_classifier(BASE_MODEL, num_labels=len(names), label_names=names, seed=cfg.seed, attention_probs_dropout_prob=cfg.attention_dropout, attn_implementation=training_attention(cfg))
            args = _training_args(cfg, str(tmp / "core"), use_bf16)
            args.disable_tqdm = True
        else:
            model = load_classifier(BASE_MODEL, num_labels=len(names), label_names=names, seed=cfg.seed)
            args = TrainingArguments(output_dir=str(tmp / "default"), per_device_train_batch_size=cfg.batch_size, num_train_epochs=1, seed=cfg.seed, use_cpu=True, save_strategy="no", report_to=[], disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)

    results = {}
    for recipe in ("core", "default"):
        make(recipe, 2 * cfg.batch_size).train()  # warm-up: 2 steps
        trainers = []
        t = timeit(lambda: trainers[-1].train(), repeats=ctx.repeats, warmup=0, setup=lambda: (trainers.clear(), trainers.append(make(recipe, n))))
        steps = trainers[-1].state.global_step
        results[recipe] = {**t.as_dict(), "examples_per_s": n / t.median, "steps": steps}
    sec.add("core.finetune settings, training examples/s", results["core"]["examples_per_s"], "ex/s", results["default"]["examples_per_s"], "Trainer defaults (fp32, random sampler, dropout 0.1)", target="ratio >= 1.5",
            note=f"{n} reviews, 128 tokens, batch 16, {results['core']['steps']} steps; bf16 autocast {'on' if use_bf16 else 'unavailable on this CPU'}")
    sec.details = {"examples": n, "max_length": mc.max_length, "batch_size": cfg.batch_size, "bf16": use_bf16, "recipes": results}
    sec.notes.append("accuracy of the two recipes trained on a full split: see finetune_accuracy")
    shutil.rmtree(tmp, ignore_errors=True)
    return sec
