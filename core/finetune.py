"""Step ``finetune``: fine-tune a sequence classifier on the train split, evaluate both models.

Training goes through the transformers ``Trainer``, so the same call runs on one CPU,
one GPU, or several processes/nodes under ``torchrun`` / ``accelerate launch``
(DDP; gloo on CPU, NCCL on GPUs) with no code change. Only rank 0 evaluates and writes.

The "pre-trained" model is the base encoder with a freshly initialised (seeded)
classifier head: the paper's "pre-trained" column, at chance level by construction.
Both are saved with ``save_pretrained`` (model + tokenizer) so every later step and
any user can ``from_pretrained`` them.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, f1_score

from core.data import load_split
from core.errors import LayerscopeError, OptionCheck
from core.models import ModelConfig, check_architecture, check_max_length, check_tokenizer, encode, load_model_config, load_classifier, load_tokenizer, predict_proba, quiet_transformers
from core.progress import bars_off
from core.files import atomic_path, write_json
from core.runfolder import RunFolder


@dataclass
class FinetuneConfig:
    epochs: float = 1.0  # passes over the train split (paper: 10)
    learning_rate: float = 5e-5  # AdamW peak learning rate (paper: 2e-5 with Adam)
    batch_size: int = 16  # examples per device per step
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_ratio: float = 0.1  # fraction of steps (below 1) with linear warm-up, then linear decay to 0
    group_by_length: bool = True  # batch texts of similar length together: far less padding
    bf16: bool = True  # bf16 autocast where the hardware supports it (fp32 master weights); the test-split evaluation uses it too
    max_train_examples: int = 0  # use at most this many training examples (0 = the whole train split)
    eval_batch_size: int = 64  # examples per forward pass when evaluating
    attention_dropout: float = 0.0  # dropout on attention probabilities (BERT: 0.1); 0 saves ~15% of CPU step time
    attention: str = field(default="auto", metadata={"hash_when_set": True})  # attention kernel while training: "eager", "sdpa", or "auto" = eager on CPU (its backward is faster there: README, "The pipeline"; docs/build-history.md), sdpa on GPUs
    seed: int = 0  # seeds the head initialisation, shuffling and dropout
    threads: int = 0  # torch CPU threads (0 = torch's default; at most 1,024)

    def validate(self) -> None:
        check = OptionCheck("finetune", self)
        check.seed("seed")
        check.positive("epochs", "learning_rate")
        check.at_least(1, "batch_size", "eval_batch_size")
        check.at_most(2**16, "batch_size", "eval_batch_size", why="texts per batch")
        check.at_least(0, "weight_decay", "max_train_examples")
        check.threads("threads")
        check.fraction("warmup_ratio", below_one=True)  # transformers reads warmup_steps >= 1 as a count of steps
        check.fraction("attention_dropout", below_one=True)
        check.choice("attention", "auto", "eager", "sdpa")


class _Encoded(torch.utils.data.Dataset):
    """Pre-tokenised examples; the collator pads each batch to its own longest text."""

    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """Accuracy, macro-F1 and the per-class report (scikit-learn), as plain floats."""
    labels = list(range(len(names)))
    rep = classification_report(y_true, y_pred, labels=labels, target_names=names, output_dict=True, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {n: {k: float(rep[n][k]) for k in ("precision", "recall", "f1-score", "support")} for n in names},
    }


def _training_args(cfg: FinetuneConfig, out_dir: str, use_bf16: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the training steps (it has no warmup_ratio)
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        report_to=[],
        seed=cfg.seed,
        dataloader_num_workers=0,
        ddp_backend=None if torch.cuda.is_available() else ("gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None),
        ddp_find_unused_parameters=False,
        disable_tqdm=bars_off(),
    )


def training_attention(cfg: FinetuneConfig) -> str:
    """The attention implementation used while training (the saved models use the library default).

    On CPU the eager kernels (bmm + softmax) train faster than PyTorch's fused attention, whose
    backward pass is slow there: measured on a 2-core AMD EPYC, batch 16 x 128 tokens with bf16
    autocast, 0.65-0.70 s per step against 0.95-0.99 s. On GPUs the fused kernel is the faster one.
    """
    if cfg.attention not in ("auto", "eager", "sdpa"):
        raise LayerscopeError(f"finetune.attention={cfg.attention!r}; choose auto, eager or sdpa")
    if cfg.attention != "auto":
        return cfg.attention
    return "sdpa" if torch.cuda.is_available() else "eager"


def trained_model(trainer):
    """The trained model, without the mixed-precision wrapper accelerate put on its forward.

    With bf16 on, accelerate wraps the model's ``forward`` in bf16 autocast for training and
    leaves it there, so evaluating ``trainer.model`` would silently run in bf16 whatever the
    caller asks (the fine-tuned model was once scored that way and the pre-trained one in fp32).
    """
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


def run_finetune(run: RunFolder, cfg: FinetuneConfig, model_cfg: ModelConfig) -> dict:
    """Fine-tune, save both models, evaluate both on the test split. Returns the step record."""
    from transformers import DataCollatorWithPadding, Trainer

    quiet_transformers()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    names = run.labels()
    train, test = load_split(run, "train"), load_split(run, "test")
    if cfg.max_train_examples and len(train) > cfg.max_train_examples:
        train = train.sample(n=cfg.max_train_examples, random_state=cfg.seed).sort_values("id")
    check_architecture(load_model_config(model_cfg.base), model_cfg.base)
    tokenizer = load_tokenizer(model_cfg.base)
    pretrained = load_classifier(model_cfg.base, num_labels=len(names), label_names=names, seed=cfg.seed)
    model = load_classifier(model_cfg.base, num_labels=len(names), label_names=names, seed=cfg.seed, attention_probs_dropout_prob=cfg.attention_dropout, attn_implementation=training_attention(cfg))
    if tokenizer.pad_token_id is None:
        raise LayerscopeError(f"tokenizer of '{model_cfg.base}' has no padding token; pick a BERT-family model")
    check_max_length(model_cfg.max_length, model.config, model_cfg.base)
    check_tokenizer(tokenizer, model.config, model_cfg.base)

    train_ids = encode(tokenizer, train["text"].tolist(), model_cfg.max_length, model_cfg.truncation)
    use_bf16 = cfg.bf16 and bf16_supported()
    args = _training_args(cfg, str(run.trainer_dir), use_bf16)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Encoded(train_ids, train["label"].tolist()),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    if not trainer.is_world_process_zero():
        return {}

    model = trained_model(trainer)
    broken = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:  # diverged: saved, it would pass for a classifier and every later step would read NaN
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        raise LayerscopeError(
            f"fine-tuning diverged: {len(broken)} weight tensors of the fine-tuned model hold NaN or inf (last training loss {losses[-1] if losses else 'not logged'}); "
            f"lower finetune.learning_rate (now {cfg.learning_rate:g}, default {FinetuneConfig.learning_rate:g}) and run the step again (nothing was saved)"
        )
    model.eval()
    model.set_attn_implementation(pretrained.config._attn_implementation)  # saved and used for inference like the pre-trained model
    for name, m in (("pretrained", pretrained), ("finetuned", model)):
        with atomic_path(run.model_dir(name)) as tmp:
            m.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    test_ids = encode(tokenizer, test["text"].tolist(), model_cfg.max_length, model_cfg.truncation)
    y = test["label"].to_numpy()
    t0 = time.perf_counter()
    evals = {}
    # Both models in the training precision. The saes step's splices always run under bf16
    # autocast and record their own unspliced accuracy beside the spliced one (accuracy_original).
    for name, m in (("pretrained", pretrained), ("finetuned", model)):
        proba = predict_proba(m, test_ids, tokenizer.pad_token_id, cfg.eval_batch_size, bf16=use_bf16)
        evals[name] = classification_metrics(y, proba.argmax(1).numpy(), names)
    eval_seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "labels": names,
        "test_examples": int(len(y)),
        "train_examples": int(len(train)),
        "pretrained": evals["pretrained"],
        "finetuned": evals["finetuned"],
        "train_loss_curve": losses,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "train_examples_per_second": len(train) * cfg.epochs / train_seconds,
        "bf16": use_bf16,
        "eval_bf16": use_bf16,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "steps": int(result.global_step),
    }
    write_json(run.finetune_metrics_path, metrics)
    return {
        "accuracy_pretrained": evals["pretrained"]["accuracy"],
        "accuracy_finetuned": evals["finetuned"]["accuracy"],
        "macro_f1_finetuned": evals["finetuned"]["macro_f1"],
        "train_seconds": round(train_seconds, 1),
        "final_loss": losses[-1] if losses else math.nan,
    }
