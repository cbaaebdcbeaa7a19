import numpy as np
import pytest
import torch

from core.errors import LayerscopeError
from core.sae import SAEConfig, SparseAutoencoder
from core.sae_metrics import evaluate_sae, feature_density


def make_sae(architecture: str) -> SparseAutoencoder:
    """d=6, m=20, k=3; latents 0-1 always fire, latents 2-4 never fire (through b_enc)."""
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=6, d_sae=20, k=3, architecture=architecture, normalization_scale=1.7), generator=g)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(6, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(20, generator=g))
        sae.b_enc[:2] = 50.0
        sae.b_enc[2:5] = -50.0
    return sae


def reference(sae: SparseAutoencoder, x: np.ndarray, dense_threshold: float) -> dict:
    """The same metrics written directly in numpy (float64)."""
    p = {name: t.detach().double().numpy() for name, t in sae.named_parameters()}
    s = sae.cfg.normalization_scale
    xn = x / s
    if sae.cfg.architecture == "topk":
        pre = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        z = np.zeros_like(pre)
        top = np.argsort(-pre, axis=1)[:, : sae.cfg.k]
        np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    else:
        z = np.maximum(xn @ p["W_enc"] + p["b_enc"], 0)
    x_hat = (z @ p["W_dec"] + p["b_dec"]) * s
    fires = z > 0
    return {
        "mse": np.mean((x - x_hat) ** 2),
        "fvu": np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2),
        "l0": fires.sum(1).mean(),
        "dead_fraction": np.mean(~fires.any(0)),
        "dense_fraction": np.mean(fires.mean(0) > dense_threshold),
        "density": fires.mean(0),
        "err": ((x - x_hat) ** 2).sum(1),  # per token
        "dev": ((x - x.mean(0)) ** 2).sum(1),  # per token, around the mean of all tokens
    }


@pytest.mark.parametrize("architecture", ["topk", "paper"])
def test_metrics_match_hand_computation(architecture):
    sae = make_sae(architecture)
    g = torch.Generator().manual_seed(1)
    x = 2 + 3 * torch.randn(70, 6, generator=g)
    got = evaluate_sae(sae, x.split(16), dense_threshold=0.3)  # 5 uneven batches
    want = reference(sae, x.double().numpy(), 0.3)
    assert got["num_tokens"] == 70
    for key in ("mse", "fvu", "l0", "dead_fraction", "dense_fraction"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    if architecture == "topk":
        assert got["l0"] == 3 and got["dead_fraction"] >= 3 / 20 and got["dense_fraction"] >= 2 / 20
    np.testing.assert_allclose(feature_density(sae, x.split(16)).numpy(), want["density"])


@pytest.mark.parametrize("architecture", ["topk", "paper"])
def test_row_chunking_inside_a_batch_changes_nothing(architecture, monkeypatch):
    import core.sae_metrics as metrics

    sae = make_sae(architecture)
    x = 2 + 3 * torch.randn(70, 6, generator=torch.Generator().manual_seed(3))
    whole = evaluate_sae(sae, [x])
    monkeypatch.setattr(metrics, "EVAL_CHUNK_ROWS", 8)  # 70 rows -> 9 chunks, the last one short
    chunked = evaluate_sae(sae, [x])
    assert chunked["num_tokens"] == 70
    for key in ("mse", "fvu", "l0", "dead_fraction", "dense_fraction"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6), key  # fp32 matmuls block rows differently
    np.testing.assert_array_equal(metrics.feature_density(sae, [x]).numpy(), reference(sae, x.double().numpy(), 0.1)["density"])


@pytest.mark.parametrize("chunk_rows", [4096, 8])
def test_rare_token_split_matches_hand_computation(chunk_rows, monkeypatch):
    import core.sae_metrics as metrics

    monkeypatch.setattr(metrics, "EVAL_CHUNK_ROWS", chunk_rows)  # 8: masks cut across row chunks too
    sae = make_sae("topk")
    g = torch.Generator().manual_seed(4)
    x = 2 + 3 * torch.randn(70, 6, generator=g)
    rare = torch.rand(70, generator=g) < 0.3
    got = evaluate_sae(sae, x.split(16), rare=rare.split(16))["rare_tokens"]
    ref = reference(sae, x.double().numpy(), 0.1)
    r, err, dev = rare.numpy(), ref["err"], ref["dev"]
    assert got["token_share"] == pytest.approx(r.mean())
    assert got["error_share"] == pytest.approx(err[r].sum() / err.sum(), rel=1e-4)
    assert got["fvu"] == pytest.approx(err[r].sum() / dev[r].sum(), rel=1e-4)
    assert got["fvu_rest"] == pytest.approx(err[~r].sum() / dev[~r].sum(), rel=1e-4)
    # the two parts recombine into the overall FVU
    total = got["fvu"] * dev[r].sum() + got["fvu_rest"] * dev[~r].sum()
    assert total / dev.sum() == pytest.approx(ref["fvu"], rel=1e-4)


def test_rare_mask_of_the_wrong_length_is_an_error():
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(5))
    with pytest.raises(LayerscopeError, match="rare-token mask"):
        evaluate_sae(make_sae("topk"), [x], rare=[torch.zeros(19, dtype=torch.bool)])


def identity_sae(scale: float) -> SparseAutoencoder:
    """Paper SAE with d=6, m=12 that reconstructs exactly: h = [relu(xn), relu(-xn)], xn_hat = relu(xn) - relu(-xn)."""
    sae = SparseAutoencoder(SAEConfig(d_in=6, d_sae=12, architecture="paper", normalization_scale=scale))
    eye = torch.eye(6)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # [d, 2d]
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # [2d, d]
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_fvu_of_perfect_and_of_mean_reconstruction():
    x = 2 + torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    # Scale 4: dividing and multiplying by a power of two is exact in float32, and every matmul
    # entry is one +-1 product plus exact zeros, so x_hat == x bit for bit and both metrics are 0.
    got = evaluate_sae(identity_sae(4.0), [x])
    assert got["mse"] == 0.0 and got["fvu"] == 0.0 and got["l0"] == 6
    # Scale 1.7: only the round trip (x / 1.7) * 1.7 rounds, by a few float32 ulps (~1e-7 relative):
    # squared errors ~1e-14 of ||x||^2, far below 1e-10.
    got = evaluate_sae(identity_sae(1.7), [x])
    assert got["mse"] < 1e-10 and got["fvu"] < 1e-10

    sae = make_sae("paper")
    with torch.no_grad():  # decoder outputs b_dec only: reconstruction = constant
        sae.W_dec.zero_()
        sae.b_dec.fill_(0.0)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    x = x - x.mean(0)  # mean is exactly 0 -> reconstructing 0 is the mean -> FVU 1
    assert evaluate_sae(sae, [x])["fvu"] == pytest.approx(1.0, rel=1e-6)


def test_empty_evaluation_is_an_error():
    with pytest.raises(LayerscopeError, match="no activations"):
        evaluate_sae(make_sae("topk"), [])
