"""Shared fixtures: a tiny random BERT + tokenizer built in-test, a tiny labelled CSV, a tiny run.

Nothing here downloads anything. The tiny run is built once per session and reused by
report, analysis and dashboard tests.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LAYERSCOPE_THREADS", str(torch.get_num_threads()))  # importing pages/_shared.py must not slow the rest of the suite


def _glibc_takes_kept_heap_threshold() -> bool:
    """Whether this is glibc and it accepts ``core.rss.kept_heap``'s 1 GiB mmap threshold (some
    versions cap it at 32 MB). Asked in a child process: mallopt changes the process it runs in."""
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        return False
    code = "import ctypes; from core.rss import KEEP_HEAP_BYTES, M_MMAP_THRESHOLD; print(ctypes.CDLL('libc.so.6').mallopt(M_MMAP_THRESHOLD, KEEP_HEAP_BYTES))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() == "1"


needs_kept_heap = pytest.mark.skipif(not _glibc_takes_kept_heap_threshold(), reason="needs a glibc that takes a 1 GiB mmap threshold")


POSITIVE = ["brilliant", "great", "wonderful", "superb", "moving", "delightful", "excellent", "fun"]
NEGATIVE = ["terrible", "awful", "boring", "dull", "painful", "weak", "bad", "messy"]
NEUTRAL = ["the", "movie", "film", "acting", "plot", "was", "and", "really", "story", "music", "quite", "a", "it", "very", "but", "ending", "cast", "this"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_sentence(rng: random.Random, label: int) -> str:
    words = POSITIVE if label == 1 else NEGATIVE
    subject = rng.choice(["movie", "film", "acting", "plot", "story", "music", "ending", "cast"])
    filler = " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(0, 6)))
    return f"the {subject} was {rng.choice(['really', 'quite', 'very'])} {rng.choice(words)} {filler} and {rng.choice(words)}".strip()


def make_dataset(n: int = 240, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    return pd.DataFrame({"text": [make_sentence(rng, y).capitalize() + "!" for y in labels], "label": ["positive" if y else "negative" for y in labels]})


def build_tiny_model(folder: Path, num_layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random BertModel and a WordPiece tokenizer over the test vocabulary, saved with save_pretrained."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + NEUTRAL + ["!", "x", "b", "<", ">", "/", "script", "alert", "(", ")", "1"]))
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    make_dataset().to_csv(path, index=False)
    return path


def tiny_overrides(model: Path, csv: Path) -> dict:
    """Settings that build a complete run in seconds."""
    return {
        "model.base": str(model),
        "model.max_length": 32,
        "data.dataset": str(csv),
        "data.max_rows": 0,
        "finetune.epochs": 10,
        "finetune.learning_rate": 1e-3,
        "finetune.batch_size": 16,
        "finetune.bf16": False,
        "activations.sae_examples": 0,
        "activations.eval_examples": 0,
        "activations.compute_dtype": "float32",
        "activations.storage_dtype": "float32",
        "activations.shard_mb": 0,
        "activations.batch_tokens": 128,
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model, tiny_csv):
    """A complete run of every step on the tiny model and data (built once per session)."""
    from core.config import load_config
    from core.pipeline import build
    from core.runfolder import RunFolder

    run = RunFolder(tmp_path_factory.mktemp("runs") / "tiny")
    cfg = load_config(preset="tiny", overrides=tiny_overrides(tiny_model, tiny_csv))
    build(run, cfg, log=lambda *_: None)
    return run
