"""Fine-tuning accuracy: the core recipe against ``Trainer`` defaults, both trained on the full split.

The finetune benchmark times 256 reviews; this one trains both recipes on the default run's
whole train split (``data.max_rows=6000``: 4,800 IMDb train reviews, 128 tokens head+tail, one
epoch, batch 16) and compares their accuracy on its 600 test reviews. Target: the core recipe
within 1 point of the baseline's accuracy, or above it. About 12 minutes on 2 cores.

* measured: ``core.finetune.run_finetune`` with the default preset, exactly as ``build`` runs it
  (bf16 autocast where the CPU has it, length-grouped batches, AdamW at 8e-5 with warm-up,
  attention dropout 0, eager attention kernels while training on a CPU);
* baseline: ``Trainer`` with default ``TrainingArguments`` (fp32, AdamW at 5e-5 without warm-up,
  random sampler, dropout 0.1 everywhere, the library's default attention kernel) apart from the
  same batch size, epochs and seed and no checkpoints, on the same tokenised reviews.

Each model is scored by the same code (``predict_proba``, scikit-learn's metrics) in the precision
it was trained in: bf16 autocast for the core recipe where the CPU has it, as ``run_finetune``
scores it, and fp32 for the baseline; the core model's fp32 accuracy is kept in the details.

One test review is 0.17 points, and two classifiers of this accuracy differ by about 2 points
from sampling alone, so the details keep the counts a McNemar test needs (reviews only one of
the two gets right) and its exact p-value.
"""

from __future__ import annotations

import shutil
import time

from bench.common import BASE_MODEL, Context, Section


def run(ctx: Context) -> Section:
    from scipy.stats import binomtest
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from core.config import load_config
    from core.data import load_split, run_data
    from core.finetune import _Encoded, classification_metrics, run_finetune
    from core.models import encode, load_classifier, load_tokenizer, predict_proba, quiet_transformers
    from core.pipeline import package_versions
    from core.runfolder import RunFolder, read_json

    quiet_transformers()
    sec = Section("finetune_accuracy", __doc__.split("\n\n")[0])
    overrides = {"data.max_rows": ctx.pick(6000, 200), "finetune.max_train_examples": ctx.pick(0, 48)}
    cfg = load_config(preset="default", overrides=overrides)
    assert cfg.model.base == BASE_MODEL
    root = ctx.work / "finetune_accuracy"
    shutil.rmtree(root, ignore_errors=True)
    run = RunFolder(root)
    run.init_manifest(cfg.to_dict(), package_versions())
    run.record_step("data", {"result": run_data(run, cfg.data)})

    # measured: the core step itself (it trains, saves both models and evaluates on the test split)
    ctx.log("   core recipe ...")
    core = run_finetune(run, cfg.finetune, cfg.model)
    core_metrics = read_json(run.finetune_metrics_path)

    # baseline: Trainer defaults on the same reviews, evaluated by the same code
    ctx.log("   Trainer defaults ...")
    names = run.labels()
    train, test = load_split(run, "train"), load_split(run, "test")
    if cfg.finetune.max_train_examples and len(train) > cfg.finetune.max_train_examples:
        train = train.sample(n=cfg.finetune.max_train_examples, random_state=cfg.finetune.seed).sort_values("id")  # as run_finetune picks them
    tok = load_tokenizer(cfg.model.base)
    train_ids = encode(tok, train["text"].tolist(), cfg.model.max_length, cfg.model.truncation)
    test_ids = encode(tok, test["text"].tolist(), cfg.model.max_length, cfg.model.truncation)
    model = load_classifier(cfg.model.base, num_labels=len(names), label_names=names, seed=cfg.finetune.seed)
    args = TrainingArguments(output_dir=str(root / "trainer_defaults"), per_device_train_batch_size=cfg.finetune.batch_size, num_train_epochs=cfg.finetune.epochs, seed=cfg.finetune.seed, use_cpu=True, save_strategy="no", report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Encoded(train_ids, train["label"].tolist()), data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    trainer.train()
    base_seconds = time.perf_counter() - t0
    y = test["label"].to_numpy()
    base_pred = predict_proba(trainer.model, test_ids, tok.pad_token_id, cfg.finetune.eval_batch_size).argmax(1).numpy()
    base_metrics = classification_metrics(y, base_pred, names)

    # the core run's predictions, from the model it saved, for the paired (McNemar) counts
    core_model = load_classifier(str(run.model_dir("finetuned")))
    core_pred = predict_proba(core_model, test_ids, tok.pad_token_id, cfg.finetune.eval_batch_size, bf16=core_metrics["eval_bf16"]).argmax(1).numpy()
    if (core_pred == y).mean() != core["accuracy_finetuned"]:
        sec.notes.append(f"the saved core model gives {(core_pred == y).mean():.4f} on reloading, against {core['accuracy_finetuned']:.4f} recorded by the step")
    core_fp32 = float((predict_proba(core_model, test_ids, tok.pad_token_id, cfg.finetune.eval_batch_size).argmax(1).numpy() == y).mean())
    only_core, only_base = int(((core_pred == y) & (base_pred != y)).sum()), int(((core_pred != y) & (base_pred == y)).sum())
    p_value = binomtest(only_core, only_core + only_base, 0.5).pvalue if only_core + only_base else 1.0

    n_test, n_train = len(y), len(train)
    sec.add("test accuracy after one epoch, core recipe (points)", 100 * core["accuracy_finetuned"], "%", 100 * base_metrics["accuracy"], "Trainer defaults, same reviews", target="value >= baseline - 1",
            note=f"{n_train} train / {n_test} test reviews; McNemar: {only_core} right only with core, {only_base} only with the baseline, exact p = {p_value:.2f}")
    sec.add("full-epoch training examples/s, core recipe", core_metrics["train_examples_per_second"], "ex/s", n_train * cfg.finetune.epochs / base_seconds, "Trainer defaults, same reviews", note="trainer.train() of each, once")
    sec.details = {
        "train_examples": n_train,
        "test_examples": n_test,
        "core": {"accuracy": core["accuracy_finetuned"], "macro_f1": core["macro_f1_finetuned"], "train_seconds": core_metrics["train_seconds"], "bf16": core_metrics["bf16"], "eval_bf16": core_metrics["eval_bf16"], "accuracy_fp32": core_fp32, "steps": core_metrics["steps"]},
        "trainer_defaults": {"accuracy": base_metrics["accuracy"], "macro_f1": base_metrics["macro_f1"], "train_seconds": base_seconds, "steps": int(trainer.state.global_step)},
        "mcnemar": {"right_only_core": only_core, "right_only_baseline": only_base, "exact_p": p_value},
        "split_hashes": run.manifest()["steps"]["data"]["result"]["hashes"],
    }
    shutil.rmtree(root, ignore_errors=True)
    return sec

