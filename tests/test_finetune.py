"""Fine-tuning on the tiny model: it learns, metrics are recomputable, torchrun works."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from core.runfolder import RunFolder
from tests.conftest import ROOT


def test_finetuned_model_learns_and_pretrained_is_chance(tiny_run):
    m = json.loads(tiny_run.finetune_metrics_path.read_text())
    assert m["finetuned"]["accuracy"] >= 0.9
    assert m["pretrained"]["accuracy"] <= 0.75  # an untrained head
    assert set(m["finetuned"]["per_class"]) == {"negative", "positive"}
    assert m["train_loss_curve"][-1] < m["train_loss_curve"][0]


def test_metrics_equal_an_independent_evaluation(tiny_run):
    """Reload the saved folders with plain transformers, predict one text at a time, score with sklearn."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from core.data import load_split

    m = json.loads(tiny_run.finetune_metrics_path.read_text())
    test = load_split(tiny_run, "test")
    for name in ("pretrained", "finetuned"):
        folder = str(tiny_run.model_dir(name))
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            pred = [int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in test["text"]]
        assert m[name]["accuracy"] == pytest.approx(accuracy_score(test["label"], pred))
        assert m[name]["macro_f1"] == pytest.approx(f1_score(test["label"], pred, average="macro"))
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_two_process_gloo_build(tmp_path, tiny_model, tiny_csv):
    """A whole build under torchrun with 2 CPU processes (DDP over gloo).

    Both processes share finetune and activations; rank 0 alone runs the other steps while
    rank 1 waits, and both leave with the process group torn down (exit code 0 each).
    """
    # TMPDIR: torchrun leaves a torchelastic_* log folder in the temporary directory
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = tmp_path / "ddp"
    opts = ["--run", str(run), "--preset", "tiny", "--model", str(tiny_model), "--dataset", str(tiny_csv), "--set", "finetune.bf16=false", "--epochs", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "core", "--"]
    out = subprocess.run([*torchrun, "build", *opts], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for step, ranks in (("data", 1), ("finetune", 2), ("activations", 2), ("similarity", 1), ("saes", 1), ("features", 1)):
        assert out.stdout.count(f"[{step}] running") == ranks, (step, out.stdout)
        assert RunFolder(run).is_done(step)
    metrics = json.loads(RunFolder(run).finetune_metrics_path.read_text())
    assert metrics["world_size"] == 2
    assert (run / "models" / "finetuned" / "model.safetensors").is_file()
    assert 0.0 <= metrics["finetuned"]["accuracy"] <= 1.0 and np.isfinite(metrics["train_loss_curve"]).all()


def test_eager_and_fused_attention_train_the_same_model(tmp_path, tiny_model, tiny_csv):
    """``finetune.attention`` picks a kernel for speed only: in fp32, eager and SDPA training of the
    tiny model end at the same weights (to float rounding), and the saved folders load with the
    library's default attention."""
    from transformers import AutoModelForSequenceClassification

    from core.config import load_config
    from core.errors import LayerscopeError
    from core.finetune import training_attention
    from core.pipeline import build
    from tests.conftest import tiny_overrides

    weights = {}
    for attention in ("eager", "sdpa"):
        run = RunFolder(tmp_path / attention)
        cfg = load_config(preset="tiny", overrides={**tiny_overrides(tiny_model, tiny_csv), "finetune.epochs": 2, "finetune.attention": attention})
        build(run, cfg, until="finetune", log=lambda *_: None)
        model = AutoModelForSequenceClassification.from_pretrained(str(run.model_dir("finetuned")))
        assert model.config._attn_implementation == "sdpa"
        weights[attention] = model.state_dict()
        head = AutoModelForSequenceClassification.from_pretrained(str(run.model_dir("pretrained"))).classifier.weight
        assert not torch.allclose(head, model.classifier.weight)  # it trained
    assert weights["eager"].keys() == weights["sdpa"].keys()
    for name, w in weights["eager"].items():
        torch.testing.assert_close(w, weights["sdpa"][name], rtol=1e-4, atol=1e-5, msg=name)

    cfg = load_config(preset="tiny")
    assert training_attention(cfg.finetune) == ("sdpa" if torch.cuda.is_available() else "eager")
    with pytest.raises(LayerscopeError, match="choose auto, eager or sdpa"):
        training_attention(dataclasses.replace(cfg.finetune, attention="flash"))  # a config built without load_config
    with pytest.raises(LayerscopeError, match="finetune.attention='flash' must be one of 'auto', 'eager', 'sdpa'"):
        load_config(preset="tiny", overrides={"finetune.attention": "flash"})


def test_trained_model_leaves_bf16_autocast_behind(tmp_path, tiny_model):
    """With bf16 on, accelerate wraps the model's forward in autocast for training and leaves it there;
    ``trained_model`` (what ``run_finetune`` evaluates and saves) gives the plain fp32 forward again."""
    from transformers import DataCollatorWithPadding, Trainer

    from core.finetune import FinetuneConfig, _Encoded, _training_args, bf16_supported, trained_model
    from core.models import load_classifier, load_tokenizer
    from tests.conftest import make_dataset

    if not bf16_supported():
        pytest.skip("this CPU has no bf16 autocast, so no wrapper is put on")
    names = ["negative", "positive"]
    tok = load_tokenizer(str(tiny_model))
    ids = [tok(t)["input_ids"] for t in make_dataset(32)["text"]]
    trainer = Trainer(
        model=load_classifier(str(tiny_model), num_labels=2, label_names=names),
        args=_training_args(FinetuneConfig(epochs=1, batch_size=8), str(tmp_path / "trainer"), use_bf16=True),
        train_dataset=_Encoded(ids, [i % 2 for i in range(32)]),
        data_collator=DataCollatorWithPadding(tok),
    )
    trainer.train()
    fresh = load_classifier(str(tiny_model), num_labels=2, label_names=names)  # same weights, never wrapped
    fresh.load_state_dict(trainer.model.state_dict())
    x = tok(["the movie was great and fun"], return_tensors="pt")
    with torch.no_grad():
        reference = fresh.eval()(**x).logits
        wrapped = trainer.model.eval()(**x).logits  # what the step used to score the fine-tuned model with
        plain = trained_model(trainer).eval()(**x).logits
    assert not torch.equal(wrapped, reference)
    assert torch.equal(plain, reference)
