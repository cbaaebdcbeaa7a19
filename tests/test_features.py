import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from core.errors import LayerscopeError
from core.features import FeatureStatsAccumulator, auroc_per_class, match_features, rank_features


def toy_latents(seed=0, n=90, m=7, examples=12, classes=3):
    """Sparse non-negative latents; tokens belong to examples, examples to classes."""
    rng = np.random.default_rng(seed)
    z = np.maximum(rng.normal(size=(n, m)), 0) * rng.uniform(0.5, 4, size=m)
    z[:, 5] = 0  # a dead feature
    ex = np.sort(rng.integers(0, examples, size=n))
    ex_label = rng.integers(0, classes, size=examples)
    ex_label[:3] = [0, 1, 2]
    return z.astype(np.float32), ex, ex_label[ex]


def feed(z, ex, lab, m, classes, chunks=(25, 40, 25), **kw):
    acc = FeatureStatsAccumulator(m, classes, **kw)
    start = 0
    for c in chunks:
        s = slice(start, start + c)
        acc.update(torch.from_numpy(z[s]), torch.from_numpy(ex[s]), torch.from_numpy(lab[s]))
        start += c
    return acc.finalize()


def test_stats_match_numpy():
    z, ex, lab = toy_latents()
    st = feed(z, ex, lab, m=7, classes=3, top_k=4, hist_bins=6)
    zd = z.astype(np.float64)
    np.testing.assert_allclose(st.variance.numpy(), zd.var(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st.density.numpy(), (z > 0).mean(0))
    for c in range(3):
        np.testing.assert_allclose(st.mean_per_class[:, c].numpy(), zd[lab == c].mean(0), rtol=1e-10)
    for f in range(7):
        order = np.argsort(-z[:, f], kind="stable")[:4]
        np.testing.assert_allclose(st.top_values[f].numpy(), z[order, f])
        if z[order, f].min() > 0:  # indices are defined up to ties only where values are > 0
            np.testing.assert_array_equal(st.top_token_index[f].numpy(), order)
            np.testing.assert_array_equal(st.top_example_ids[f].numpy(), ex[order])
    assert (st.top_token_index[5] == -1).all() and (st.top_values[5] == 0).all()
    assert st.num_tokens == 90 and st.num_examples == len(np.unique(ex))


def test_histogram_counts_are_exact():
    z, ex, lab = toy_latents(seed=3)
    st = feed(z, ex, lab, m=7, classes=3, hist_bins=6)
    for f in range(7):
        nz = z[:, f][z[:, f] > 0]
        assert st.hist_counts[f].sum() == len(nz)
        if len(nz):
            hi = st.hist_edges[f, -1].item()
            assert hi >= nz.max() and hi / 2 < nz.max() and np.log2(hi) == round(np.log2(hi))
            expected, _ = np.histogram(nz, bins=6, range=(0, hi))
            np.testing.assert_array_equal(st.hist_counts[f].numpy(), expected)


def test_selectivity_auroc_matches_sklearn():
    z, ex, lab = toy_latents(seed=1)
    st = feed(z, ex, lab, m=7, classes=3)
    examples = np.unique(ex)
    ex_max = np.stack([z[ex == e].max(0) for e in examples]).astype(np.float16).astype(np.float64)
    ex_lab = np.array([lab[ex == e][0] for e in examples])
    for f in range(7):
        for c in range(3):
            y = ex_lab == c
            if f == 5:  # constant scores: AUROC 0.5
                assert st.selectivity_auroc[f, c].item() == pytest.approx(0.5)
            else:
                assert st.selectivity_auroc[f, c].item() == pytest.approx(roc_auc_score(y, ex_max[:, f]), abs=1e-12)


def test_auroc_undefined_and_unlabelled():
    scores = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    labels = torch.tensor([0, 0, -1, 0])  # class 1 absent, one unlabelled example
    auc = auroc_per_class(scores, labels, 2)
    assert torch.isnan(auc).all()
    auc = auroc_per_class(scores, torch.tensor([0, 1, -1, 1]), 2)
    assert auc[0, 1].item() == pytest.approx(roc_auc_score([0, 1, 1], [0.1, 0.9, 0.7]))


def test_rank_features():
    z, ex, lab = toy_latents(seed=2)
    st = feed(z, ex, lab, m=7, classes=3)
    np.testing.assert_array_equal(rank_features(st).numpy(), np.argsort(-z.astype(np.float64).var(0), kind="stable"))
    np.testing.assert_array_equal(rank_features(st, by="density").numpy(), np.argsort(-(z > 0).mean(0), kind="stable"))
    # selectivity: the whole order against numpy's stable argsort (ties keep index order; this data has one:
    # features 2 and 3 are both 0.25 from chance, at AUROC 0.25 and 0.75)
    auc = st.selectivity_auroc.numpy()
    sel = np.abs(auc - 0.5).max(1)
    assert len(np.unique(sel)) < len(sel)  # the tie is there to be kept
    np.testing.assert_array_equal(rank_features(st, by="selectivity").numpy(), np.argsort(-sel, kind="stable"))
    for c in range(3):  # signed, per class: features firing more on class c first
        np.testing.assert_array_equal(rank_features(st, by="selectivity", class_index=c).numpy(), np.argsort(-(auc[:, c] - 0.5), kind="stable"))
    # a class with no examples has undefined (NaN) AUROCs: it ranks nothing up or down
    st4 = feed(z, ex, lab, m=7, classes=4)
    assert np.isnan(st4.selectivity_auroc[:, 3].numpy()).all()
    np.testing.assert_array_equal(rank_features(st4, by="selectivity").numpy(), np.argsort(-sel, kind="stable"))
    np.testing.assert_array_equal(rank_features(st4, by="selectivity", class_index=3).numpy(), np.arange(7))
    with pytest.raises(LayerscopeError, match="unknown ranking"):
        rank_features(st, by="fancy")
    with pytest.raises(LayerscopeError, match="out of range"):
        rank_features(st, by="selectivity", class_index=3)


def decoder(m=40, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(m, d))


def test_matching_recovers_planted_permutation():
    a = decoder()
    perm = np.random.default_rng(1).permutation(40)  # b[j] = a[perm[j]] + noise
    b = a[perm] + 0.01 * np.random.default_rng(2).normal(size=a.shape)
    r = match_features(torch.from_numpy(a), b)
    np.testing.assert_array_equal(r.partner_of_b, perm)
    np.testing.assert_array_equal(r.partner_of_a[perm], np.arange(40))
    assert (r.status_of_a == "kept").all() and (r.status_of_b == "kept").all()
    assert r.kept == 1.0 and r.shifted == r.lost == r.new == 0.0
    assert (r.similarity_of_a > 0.99).all()
    assert r.describe(perm[0]).startswith(f"feature {perm[0]} in pretrained ↔ feature 0 in finetuned, cos ")


def test_matching_replaced_rows_are_lost_and_new():
    a = decoder(d=64)
    b = a.copy()
    replaced = np.array([3, 17, 28])
    b[replaced] = decoder(m=3, d=64, seed=9)  # unrelated directions: |cos| ~ 0.1 in 64 dims
    b[5] = 0.8 * a[5] + 0.6 * np.linalg.norm(a[5]) * np.eye(64)[0]  # a moderately rotated copy
    r = match_features(a, b, kept_threshold=0.95, shifted_threshold=0.4)
    cos5 = b[5] @ a[5] / np.linalg.norm(b[5]) / np.linalg.norm(a[5])
    assert 0.4 < cos5 < 0.95
    assert r.status_of_a[5] == "shifted" and r.partner_of_a[5] == 5
    lost = set(np.flatnonzero(r.status_of_a == "lost"))
    new = set(np.flatnonzero(r.status_of_b == "new"))
    assert lost == set(replaced) and new == set(replaced)
    assert r.counts == {"kept": 36, "shifted": 1, "lost": 3, "new": 3, "alive_a": 40, "alive_b": 40, "dead_a": 0, "dead_b": 0}
    assert r.kept + r.shifted + r.lost == pytest.approx(1.0)


def test_matching_sizes_dead_and_activation_blend():
    a = decoder(m=10)
    b = np.concatenate([a, decoder(m=3, seed=5)])  # b has 3 extra features
    alive_a = np.ones(10, bool)
    alive_a[2] = False
    r = match_features(a, b, alive_a=alive_a)
    assert r.status_of_a[2] == "dead" and r.partner_of_a[2] == -1 and np.isnan(r.similarity_of_a[2])
    assert r.counts["alive_a"] == 9 and r.counts["dead_a"] == 1
    assert r.counts["kept"] == 9 and r.lost == 0.0
    assert r.counts["new"] == 4  # b's copy of a[2] plus the 3 extra ones
    assert r.counts["kept"] + r.counts["shifted"] + r.counts["new"] == r.counts["alive_b"]

    # identical decoders, activations say features 0 and 1 are swapped -> alpha=1 follows activations
    rng = np.random.default_rng(0)
    acts_a = rng.random((50, 4))
    acts_b = acts_a[:, [1, 0, 2, 3]]
    r = match_features(a[:4], a[:4], acts_a=acts_a, acts_b=acts_b, alpha=1.0)
    np.testing.assert_array_equal(r.partner_of_a, [1, 0, 2, 3])
    assert r.kept == 1.0
    with pytest.raises(LayerscopeError, match="pass acts_a and acts_b"):
        match_features(a, a, alpha=0.5)
    with pytest.raises(LayerscopeError, match="cannot be matched"):
        match_features(a, decoder(m=10, d=5))
