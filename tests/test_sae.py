import json

import numpy as np
import pytest
import torch

from core.errors import LayerscopeError
from core.sae import (
    CsrColumns,
    SAEConfig,
    SparseAutoencoder,
    check_compatible,
    sparse_decode,
    topk_encode,
    topk_rows,
)


def make_sae(architecture="topk", d_in=8, d_sae=32, k=4, scale=2.5, seed=0) -> SparseAutoencoder:
    cfg = SAEConfig(
        d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, normalization_scale=scale,
        hook_name="bert.encoder.layer.1", hidden_state_index=2, model_path="some/model",
    )
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(cfg, generator=g)
    with torch.no_grad():  # non-trivial biases so that they matter in every check
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        if architecture == "paper":
            sae.W_dec.mul_(torch.rand(d_sae, 1, generator=g) + 0.5)
    return sae


def data(n=50, d=8, seed=1) -> torch.Tensor:
    return 3 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_topk_leaves_exactly_k_active_latents():
    sae = make_sae(k=5)
    x_hat, z = sae(data(200))
    assert z.shape == (200, 32)
    assert ((z > 0).sum(1) == 5).all()
    torch.testing.assert_close(sae.encode(data(200)), z)
    torch.testing.assert_close(sae.decode(z), x_hat, rtol=1e-5, atol=1e-5)


def test_normalization_is_internal():
    x = data(20)
    a, b = make_sae(scale=1.0), make_sae(scale=4.0)
    xa, za = a(x)
    xb, zb = b(4.0 * x)
    torch.testing.assert_close(zb, za)
    torch.testing.assert_close(xb, 4.0 * xa)


def test_topk_rows_is_exact():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 512, generator=g)
    # adversarial rows: the 16 largest entries packed into few groups (every 64th column = one
    # strided group of 8 columns) or into one run of neighbouring columns
    pre[0, ::64] += 10.0
    pre[1, 64:72] += 10.0
    pre[2, 3::64] += 10.0
    pre[2, 5::64] += 10.0
    values, indices = topk_rows(pre, 16)
    torch.testing.assert_close(pre.gather(1, indices), values)
    want = pre.topk(16, dim=1)
    torch.testing.assert_close(values.sort(1).values, want.values.sort(1).values)
    assert torch.equal(indices.sort(1).values, want.indices.sort(1).values)  # no ties in random data: same latents


def test_sparse_kernels_match_dense_autograd():
    g = torch.Generator().manual_seed(0)
    n, d, m, k = 40, 6, 48, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    params = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((d, m), (m,), (m, d), (d,))]
    upstream = torch.randn(n, d, generator=g, dtype=torch.float64)

    def sparse(W, b, Wd, bd):
        v, i = topk_encode(x, bd, W, b, k)
        return sparse_decode(v, i, Wd) + bd

    cols = CsrColumns()

    def shared(W, b, Wd, bd):  # as the trainer calls them: one sort of the indices for both backwards
        v, i = topk_encode(x, bd, W, b, k, cols=cols)
        return sparse_decode(v, i, Wd, cols=cols) + bd

    def dense(W, b, Wd, bd):
        pre = (x - bd) @ W + b
        v, i = pre.topk(k, dim=1)
        return torch.zeros(n, m, dtype=x.dtype).scatter(1, i, v.relu()) @ Wd + bd

    grads = []
    for fn in (dense, sparse, shared):
        out = fn(*params)
        grads.append((out.detach(), torch.autograd.grad(out, params, upstream)))
    assert cols.builds == 1  # the decoder's backward sorted the indices, the encoder's reused them
    for got in grads[1:]:
        torch.testing.assert_close(got[0], grads[0][0])
        for a, b in zip(got[1], grads[0][1]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("architecture", ["topk", "paper"])
def test_reconstruct_equals_forward(architecture):
    sae = make_sae(architecture)
    x = data()
    with torch.no_grad():
        assert torch.equal(sae.reconstruct(x), sae(x)[0])


def test_gradient_parallel_to_decoder_rows_is_removed():
    sae = make_sae()
    x_hat, _ = sae(data())
    x_hat.pow(2).mean().backward()

    def parallel_share():  # |component along each row| / |row gradient|, worst row
        g = sae.W_dec.grad
        return ((g * sae.W_dec).sum(1).abs() / g.norm(dim=1).clamp_min(1e-12)).max()

    assert parallel_share() > 0.1
    sae.remove_gradient_parallel_to_decoder_directions()
    assert parallel_share() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


@pytest.mark.parametrize("architecture", ["topk", "paper"])
def test_save_load_gives_identical_outputs(tmp_path, architecture):
    sae = make_sae(architecture)
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert meta["format"] == "layerscope-sae-1" and meta["architecture"] == architecture
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    x = data()
    for a, b in zip(sae(x), loaded(x)):
        assert torch.equal(a, b)


def test_truncated_weights_raise_clear_error(tmp_path):
    make_sae().save(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(LayerscopeError, match=r"sae_weights.safetensors is truncated or not a safetensors file.*--force"):
        SparseAutoencoder.load(tmp_path)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(LayerscopeError, match="truncated or not a safetensors"):
        SparseAutoencoder.load(tmp_path)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(LayerscopeError, match="does not exist"):
        SparseAutoencoder.load(tmp_path / "nope")
    make_sae().save(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    meta = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**meta, "d_sae": 64}))
    with pytest.raises(LayerscopeError, match=r"W_enc has shape \(8, 32\) but cfg.json \(d_in=8, d_sae=64\)"):
        SparseAutoencoder.load(tmp_path)
    cfg_path.write_text(json.dumps({**meta, "architecture": "gated"}))
    with pytest.raises(LayerscopeError, match="is damaged: unknown SAE architecture 'gated'") as e:
        SparseAutoencoder.load(tmp_path)
    assert "saes --run" in str(e.value) and "use one of" not in str(e.value)  # the fix is to train it again
    for field, value in (("k", "32"), ("k", 10**9), ("hidden_state_index", "3")):  # a field a hand edit broke
        cfg_path.write_text(json.dumps({**meta, field: value}))
        with pytest.raises(LayerscopeError, match=f"cfg.json is damaged: {field}=") as e:
            SparseAutoencoder.load(tmp_path)
        assert "--sae-k" not in str(e.value) and "expansion factor" not in str(e.value) and "--force` to train it again" in str(e.value)
    cfg_path.write_text("{")
    with pytest.raises(LayerscopeError, match="not valid JSON"):
        SparseAutoencoder.load(tmp_path)
    cfg_path.unlink()
    with pytest.raises(LayerscopeError, match="cfg.json is missing"):
        SparseAutoencoder.load(tmp_path)


def test_config_validation():
    with pytest.raises(LayerscopeError, match="k=5000 is larger than d_sae=1536; lower --sae-k or raise the expansion factor"):
        SAEConfig(d_in=384, d_sae=1536, k=5000)
    with pytest.raises(LayerscopeError, match="d_sae"):
        SAEConfig(d_in=384, d_sae=0)
    with pytest.raises(LayerscopeError, match="architecture"):
        SAEConfig(d_in=384, d_sae=16, architecture="jumprelu")
    SAEConfig(d_in=4, d_sae=8, architecture="paper", k=5000)  # k is unused by "paper"


def test_check_compatible():
    sae = make_sae(d_in=8)
    check_compatible(sae, 8, "some/model")
    with pytest.raises(LayerscopeError, match="reads 8-wide activations but the model's hidden size is 384"):
        check_compatible(sae, 384)
    with pytest.raises(LayerscopeError, match="trained on activations of 'some/model', not 'other/model'"):
        check_compatible(sae, 8, "other/model")
    with pytest.raises(LayerscopeError, match="8 wide|d_in=8"):
        sae(torch.zeros(3, 5))


def test_paper_architecture_is_linear_relu_linear():
    sae = make_sae("paper")
    x = data()
    h = np.maximum(x.numpy() / 2.5 @ sae.W_enc.detach().numpy() + sae.b_enc.detach().numpy(), 0)
    x_hat = (h @ sae.W_dec.detach().numpy() + sae.b_dec.detach().numpy()) * 2.5
    out, z = sae(x)
    np.testing.assert_allclose(z.detach().numpy(), h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.detach().numpy(), x_hat, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d_sae, k", [(32, 5), (64, 4)])  # one top-k over all latents; topk_rows' two-stage path
def test_topk_architecture_matches_numpy(d_sae, k):
    """TopK encode/decode against the module docstring written in numpy (float64, argsort top-k)."""
    sae = make_sae(d_sae=d_sae, k=k)
    with torch.no_grad():
        sae.b_enc.sub_(1.5)  # some top-k pre-activations <= 0: the ReLU matters
    x = data(200)
    p = {name: t.detach().double().numpy() for name, t in sae.named_parameters()}
    s = 2.5  # make_sae's normalization_scale
    pre = (x.double().numpy() / s - p["b_dec"]) @ p["W_enc"] + p["b_enc"]  # b_dec subtracted in normalised units
    top = np.argsort(-pre, axis=1)[:, :k]
    z = np.zeros_like(pre)
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    x_hat = (z @ p["W_dec"] + p["b_dec"]) * s
    assert 0 < (z > 0).sum() < 200 * k  # some kept latents were cut to 0 by the ReLU

    with torch.no_grad():
        out, latents = sae(x)
        values, indices = sae.encode_sparse(x)
        np.testing.assert_allclose(latents.numpy(), z, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sae.encode(x).numpy(), z, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.sort(indices.numpy(), 1), np.sort(top, 1))
        np.testing.assert_allclose(values.numpy(), np.take_along_axis(z, indices.numpy(), 1), rtol=1e-5, atol=1e-5)
        for got in (out, sae.reconstruct(x), sae.decode(torch.from_numpy(z).float())):
            np.testing.assert_allclose(got.numpy(), x_hat, rtol=1e-4, atol=1e-4)
