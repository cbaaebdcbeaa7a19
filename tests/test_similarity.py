"""Similarity measures, checked against independent computations."""

import numpy as np
import pytest
import torch

from core.similarity import CrossCovariance, linear_cka


def _cka_gram(x: np.ndarray, y: np.ndarray) -> float:
    """CKA the textbook way: HSIC on centred n x n Gram matrices (Kornblith et al. 2019, eq. 1-2)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def test_linear_cka_matches_gram_form_and_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    y = x @ rng.normal(size=(8, 6)) + 0.5 * rng.normal(size=(50, 6))
    assert linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(_cka_gram(x, y), rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(torch.tensor(x), torch.tensor(3 * x @ q + 5)) == pytest.approx(1.0, abs=1e-9)


def test_streamed_cka_equals_in_memory_even_with_large_means():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(300, 16)) + 50.0 * rng.normal(size=16) for _ in range(2)]  # big offsets
    ys = [x @ rng.normal(size=(16, 16)) + rng.normal(size=(300, 16)) for x in xs]
    cov = CrossCovariance(2, 2, 16)
    for lo in range(0, 300, 70):  # uneven chunks
        cov.update([torch.tensor(x[lo : lo + 70], dtype=torch.float32) for x in xs], [torch.tensor(y[lo : lo + 70], dtype=torch.float32) for y in ys])
    got = cov.cka()
    for i in range(2):
        for j in range(2):
            assert got[i, j] == pytest.approx(_cka_gram(xs[i], ys[j]), abs=2e-4)


def test_run_similarity_equals_direct_transformers_computation(tiny_run):
    """Recompute every measure from transformers outputs, one text at a time, no batching or shards."""
    from transformers import AutoModel

    from core.data import load_split
    from core.models import encode, load_tokenizer
    from core.similarity import load_similarity

    sim = load_similarity(tiny_run)
    cfg = tiny_run.manifest()["config"]["model"]
    tok = load_tokenizer(str(tiny_run.model_dir("pretrained")))
    texts = load_split(tiny_run, "test")["text"].tolist()
    models = [AutoModel.from_pretrained(str(tiny_run.model_dir(m))).eval() for m in ("pretrained", "finetuned")]
    per_model = []  # [model][layer] -> list of [len, d] arrays
    for model in models:
        layers = None
        for ids in encode(tok, texts, cfg["max_length"], cfg["truncation"]):
            with torch.no_grad():
                hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            layers = layers or [[] for _ in hs]
            for l, h in enumerate(hs):
                layers[l].append(h[0].double().numpy())
        per_model.append(layers)
    assert len(sim["layers"]) == len(per_model[0])
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    for l, row in enumerate(sim["layers"]):
        pre, ft = per_model[0][l], per_model[1][l]
        pooled_pre = np.stack([h.mean(0) for h in pre])
        pooled_ft = np.stack([h.mean(0) for h in ft])
        assert row["cosine_of_means"] == pytest.approx(cos(pooled_pre.mean(0), pooled_ft.mean(0)), abs=1e-5)
        assert row["mean_cosine"] == pytest.approx(np.mean([cos(a, b) for a, b in zip(pooled_pre, pooled_ft)]), abs=1e-5)
        tokens_pre, tokens_ft = np.concatenate(pre), np.concatenate(ft)
        token_cos = np.mean([cos(a, b) for a, b in zip(tokens_pre, tokens_ft)])
        assert row["token_cosine"] == pytest.approx(token_cos, abs=1e-5)
        assert row["cka"] == pytest.approx(_cka_gram(tokens_pre, tokens_ft), abs=1e-4)
    last = len(sim["layers"]) - 1
    assert sim["cka_matrix"][0][last] == pytest.approx(_cka_gram(np.concatenate(per_model[0][0]), np.concatenate(per_model[1][last])), abs=1e-4)
