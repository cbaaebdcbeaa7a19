import math

import numpy as np
import pytest
import torch

from core.errors import LayerscopeError
from core.sae import SAEConfig
from core.sae_training import SAETrainingConfig, geometric_median, normalization_scale, num_steps, train_sae


def planted(n: int, d=16, atoms=32, active=3, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples that are sparse positive combinations of `active` out of `atoms` unit vectors."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, atoms).scatter(1, idx, 0.5 + torch.rand(n, active, generator=g))
    return coef @ D, D


def random_batches(n_batches=6, rows=64, d=8, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [5 + 3 * torch.randn(rows, d, generator=g) for _ in range(n_batches)]


def quick(**kw) -> SAETrainingConfig:
    return SAETrainingConfig(**{"batch_size": 64, "lr": 1e-3, "lr_warmup_steps": 2, "log_every": 2, **kw})


@pytest.mark.parametrize("bf16", [False, True])
def test_topk_learns_planted_dictionary(bf16):
    x, D = planted(128 * 300)
    sae, hist = train_sae(
        SAEConfig(d_in=16, d_sae=64, k=4),
        SAETrainingConfig(lr=3e-3, batch_size=128, lr_warmup_steps=10, dead_steps_threshold=20, autocast_bf16=bf16),
        x.split(128), init_sample=x[:2000], total_steps=300, progress=False,
    )
    assert hist["num_steps"] == 300 and hist["num_tokens"] == 128 * 300
    assert hist["loss"][-1] < 0.3 * hist["loss"][0]
    best_cos = (D @ sae.W_dec.detach().T).amax(1)  # [atoms] best decoder row per planted atom
    assert (best_cos > 0.9).float().mean() >= 0.9


def test_decoder_rows_stay_unit_norm_and_history_is_filled():
    sae, hist = train_sae(SAEConfig(d_in=8, d_sae=32, k=4), quick(), random_batches(), init_sample=random_batches()[0], progress=False)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert hist["step"] == [2, 4, 6] and len(hist["loss"]) == 3
    assert all(l0 == pytest.approx(4.0) for l0 in hist["l0"])
    assert 0 <= hist["dead_fraction"] <= 1 and hist["tokens_per_second"] > 0
    assert not sae.training


def test_paper_architecture_loss_falls():
    x, _ = planted(128 * 150, seed=1)
    sae, hist = train_sae(
        SAEConfig(d_in=16, d_sae=64, architecture="paper", l1_coefficient=1e-3),
        SAETrainingConfig(lr=1e-3, batch_size=128, lr_warmup_steps=5, autocast_bf16=False, log_every=10),
        x.split(128), init_sample=x[:1000], progress=False,
    )
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["aux_loss"][-1] > 0  # the L1 term is reported in aux_loss


@pytest.mark.parametrize("bf16", [False, True])
def test_paper_step_loss_and_gradients_match_the_textbook_formula(bf16):
    """MSE + lambda * mean|h| written out plainly (fp32 copy of h, abs), against the trainer's step."""
    from core.sae import SparseAutoencoder
    from core.sae_training import _paper_step

    gen = torch.Generator().manual_seed(3)
    cfg = SAEConfig(d_in=16, d_sae=64, architecture="paper", l1_coefficient=0.05)
    sae = SparseAutoencoder(cfg, generator=gen)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=gen)  # some latents off, some on
    xn = torch.randn(256, 16, generator=gen)

    loss, mse, l1, fired, active = _paper_step(sae, xn, bf16)
    got = {"loss": loss.item(), "mse": mse.item(), "l1": l1.item(), "active": active}
    grads = torch.autograd.grad(loss, list(sae.parameters()))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = torch.relu(xn @ sae.W_enc + sae.b_enc)
        xn_hat = h @ sae.W_dec + sae.b_dec
    h32 = h.float()
    ref_mse = (xn_hat.float() - xn).pow(2).mean()
    ref_l1 = h32.abs().mean()
    ref_loss = ref_mse + cfg.l1_coefficient * ref_l1
    ref_grads = torch.autograd.grad(ref_loss, list(sae.parameters()))

    assert got["active"] == int((h32 > 0).sum()) and torch.equal(fired, (h32 > 0).any(0))
    assert 0 < got["active"] < h.numel()
    assert math.isclose(got["l1"], ref_l1.item(), rel_tol=1e-6)
    assert math.isclose(got["mse"], ref_mse.item(), rel_tol=1e-6)
    assert math.isclose(got["loss"], ref_loss.item(), rel_tol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_dead, aux_k", [(5, 8), (48, 3)])  # AuxK scale n_dead/aux_k < 1 over all dead; scale 1, a real top-3
def test_topk_step_loss_and_gradients_match_a_dense_float64_computation(n_dead, aux_k):
    """MSE + AuxK of the module docstring written out densely (float64, torch.topk) against `_topk_step`."""
    from core.sae import SparseAutoencoder
    from core.sae_training import _topk_step

    gen = torch.Generator().manual_seed(5)
    n, d, m, k, aux_coef = 96, 8, 64, 4, 0.5  # m >= 16 k: topk_rows takes its two-stage path
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=m, k=k), generator=gen)
    with torch.no_grad():
        sae.b_enc.copy_(0.5 * torch.randn(m, generator=gen) - 1.0)  # some top-k values <= 0: ReLU matters
        sae.b_dec.copy_(0.3 * torch.randn(d, generator=gen))
    xn = torch.randn(n, d, generator=gen)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=gen)[:n_dead]] = True

    params = list(sae.parameters())
    loss, mse, aux, fired, active = _topk_step(sae, xn, dead, aux_k, aux_coef, bf16=False)
    grads = [torch.autograd.grad(t, params, retain_graph=True) for t in (mse, aux, loss)]

    W_enc, b_enc, W_dec, b_dec = ref_params = [p.detach().double().requires_grad_() for p in params]
    x = xn.double()
    pre = (x - b_dec) @ W_enc + b_enc  # [n, m]
    top = pre.topk(k, dim=1)
    z = torch.zeros(n, m, dtype=x.dtype).scatter(1, top.indices, top.values.relu())
    x_hat = z @ W_dec + b_dec
    ref_mse = (x - x_hat).pow(2).sum() / (n * d)
    e = (x - x_hat).detach()  # the residual is a target, not a path for gradients
    pre_dead = pre[:, dead]  # [n, n_dead]
    top_dead = pre_dead.topk(min(aux_k, n_dead), dim=1)
    z_dead = torch.zeros(n, n_dead, dtype=x.dtype).scatter(1, top_dead.indices, top_dead.values.relu())
    e_hat = z_dead @ W_dec[dead]  # no b_dec: the dead latents model the residual only
    ref_aux = min(n_dead / aux_k, 1.0) * (e - e_hat).pow(2).sum() / (n * d)
    ref_loss = ref_mse + aux_coef * ref_aux
    ref_grads = [torch.autograd.grad(t, ref_params, retain_graph=True) for t in (ref_mse, ref_aux, ref_loss)]

    assert 0 < active < n * k and active == int((z > 0).sum())
    assert torch.equal(fired, (z > 0).any(0))
    assert ref_aux.item() > 0.01 * ref_mse.item()  # the AuxK term is not negligible here
    for got, want in ((mse, ref_mse), (aux, ref_aux), (loss, ref_loss)):
        assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
    for got, want in zip(grads, ref_grads):
        for name, g, r in zip(("W_enc", "b_enc", "W_dec", "b_dec"), got, want):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6, msg=name)


def test_normalization_scale_and_b_dec_init():
    batches = random_batches()
    sample = torch.cat(batches)
    sae, hist = train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(max_steps=1, lr_warmup_steps=0, init_b_dec="mean"),
                          batches, init_sample=sample, progress=False)
    x = sample.double().numpy()
    expected = math.sqrt(((x - x.mean(0)) ** 2).sum(1).mean() / 8)
    assert sae.cfg.normalization_scale == pytest.approx(expected, rel=1e-9)
    assert hist["normalization_scale"] == sae.cfg.normalization_scale
    # b_dec starts at the mean and moves by at most ~lr per coordinate in one Adam step
    torch.testing.assert_close(sae.b_dec.detach(), torch.from_numpy(x.mean(0) / expected).float(), atol=2e-3, rtol=0)


def test_geometric_median_resists_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 3, generator=g) * 0.1, torch.full((20, 3), 100.0)])
    assert geometric_median(x).norm() < 0.5 < x.mean(0).norm()
    assert normalization_scale(torch.ones(5, 3)) == 0


def test_geometric_median_matches_weiszfeld_in_numpy_whatever_the_chunk():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 6, generator=g) * torch.tensor([1.0, 2, 3, 0.5, 1, 4]) + 3.0
    x[:50] += 40.0  # outliers pull the mean, not the median
    a = x.double().numpy()
    y = a.mean(0)
    for _ in range(30):
        w = 1.0 / np.maximum(np.linalg.norm(a - y, axis=1), 1e-8)
        y = (w[:, None] * a).sum(0) / w.sum()
    for chunk in (7, 1000, 4096):
        np.testing.assert_allclose(geometric_median(x, chunk=chunk).numpy(), y, rtol=0, atol=1e-4)
    summed = lambda p: np.linalg.norm(a - p, axis=1).sum()  # noqa: E731
    m = geometric_median(x).double().numpy()
    steps = np.vstack([np.eye(6), -np.eye(6)]) * 1e-2  # a minimum: no step along an axis lowers the summed distance
    assert all(summed(m) <= summed(m + step) for step in steps) and summed(m) < summed(a.mean(0))


def test_training_is_seeded_and_batches_are_recut():
    sizes = [10, 100, 37, 64, 3, 90]  # 304 rows -> steps of 64, 64, 64, 64, 48
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(s, 8, generator=g).half() for s in sizes]
    runs = [train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(), batches, init_sample=batches[1], progress=False) for _ in range(2)]
    (a, ha), (b, hb) = runs
    assert ha["num_steps"] == 5 and ha["num_tokens"] == 304
    assert num_steps(304, quick()) == 5 and num_steps(304, quick(epochs=3, max_steps=7)) == 7
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    c, _ = train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(seed=1), batches, init_sample=batches[1], progress=False)
    assert not torch.equal(a.W_dec, c.W_dec)


def test_epochs_and_max_steps():
    batches = random_batches(n_batches=3)
    _, h = train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(epochs=2), batches, init_sample=batches[0], progress=False)
    assert h["num_steps"] == 6
    _, h = train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(epochs=2, max_steps=4), batches, init_sample=batches[0], progress=False)
    assert h["num_steps"] == 4
    with pytest.raises(ValueError, match="re-iterable"):
        train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(epochs=2), iter(batches), init_sample=batches[0], progress=False)


def test_auxk_loss_kicks_in_for_dead_latents():
    batches = random_batches(n_batches=8)
    cfg = SAEConfig(d_in=8, d_sae=64, k=1)
    _, h = train_sae(cfg, quick(dead_steps_threshold=1, aux_k=4), batches, init_sample=batches[0], progress=False)
    assert max(h["aux_loss"]) > 0
    _, h = train_sae(cfg, quick(dead_steps_threshold=1, aux_coefficient=0.0), batches, init_sample=batches[0], progress=False)
    assert max(h["aux_loss"]) == 0


def test_user_errors():
    cfg = SAEConfig(d_in=8, d_sae=16, k=2)
    with pytest.raises(LayerscopeError, match=r"init_sample has shape \(10, 5\)"):
        train_sae(cfg, quick(), random_batches(), init_sample=torch.randn(10, 5), progress=False)
    with pytest.raises(LayerscopeError, match="no activation batches"):
        train_sae(cfg, quick(), [], init_sample=torch.randn(10, 8), progress=False)
    with pytest.raises(LayerscopeError, match="5 wide but the SAE expects d_in=8"):
        train_sae(cfg, quick(), [torch.randn(64, 5)], init_sample=torch.randn(10, 8), progress=False)
    with pytest.raises(LayerscopeError, match="identical"):
        train_sae(cfg, quick(), random_batches(), init_sample=torch.ones(10, 8), progress=False)
    with pytest.raises(LayerscopeError, match="NaN"):
        train_sae(cfg, quick(), random_batches(), init_sample=torch.full((10, 8), float("nan")), progress=False)


def test_nan_batches_stop_training_with_a_clear_error():
    batches = random_batches()
    batches[2][0, 0] = float("nan")
    with pytest.raises(LayerscopeError, match="loss became nan at step 2"):
        train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(), batches, init_sample=batches[0], progress=False)


def test_training_stops_at_the_next_step_when_side_by_side_jobs_are_abandoned():
    """Ctrl-C during side-by-side training (core.threads): the trainer stops instead of running on."""
    import core.threads as threads

    seen = []

    def batches():
        for i, b in enumerate(random_batches(n_batches=50)):
            seen.append(i)
            if i == 3:
                threads._stop.set()  # what run_side_by_side does when the run is abandoned
            yield b

    try:
        with pytest.raises(threads.Abandoned, match="stopped at step 3"):
            train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(), batches(), init_sample=random_batches()[0], progress=False)
    finally:
        threads._stop.clear()
    assert seen == [0, 1, 2, 3]
    sae, hist = train_sae(SAEConfig(d_in=8, d_sae=16, k=2), quick(), random_batches(), init_sample=random_batches()[0], progress=False)
    assert hist["num_steps"] == 6  # cleared: the next training runs to the end


def test_default_learning_rates():
    assert SAETrainingConfig().resolved_lr(SAEConfig(d_in=384, d_sae=1536)) == pytest.approx(6.53e-4, rel=1e-3)
    assert SAETrainingConfig().resolved_lr(SAEConfig(d_in=384, d_sae=1536, architecture="paper")) == 2e-5
    assert SAETrainingConfig(lr=1e-3).resolved_lr(SAEConfig(d_in=384, d_sae=1536)) == 1e-3


def test_lr_schedule_warms_up_holds_and_decays_linearly():
    """`_lr_factor` at hand-derived points: warm-up (step + 1) / warmup, then 1, then the last
    decay * total steps ramp down as (total - step) / (decay * total), so step total would be 0."""
    from core.sae_training import _lr_factor

    def f(step, total=100, warmup=10, decay=0.2):  # 100 steps: warm-up 0-9, plateau 10-80, decay over the last 20
        return _lr_factor(step, total, warmup, decay)

    assert f(0) == pytest.approx(1 / 10)  # first step already moves, at a tenth of the rate
    assert f(4) == pytest.approx(5 / 10)
    assert f(9) == 1.0 and f(10) == 1.0 and f(50) == 1.0 and f(80) == 1.0  # (100 - 80) / 20 = 1
    assert f(81) == pytest.approx(19 / 20)
    assert f(90) == pytest.approx(10 / 20)
    assert f(99) == pytest.approx(1 / 20)  # last step: one decay step short of 0
    assert f(100) == 0.0 and f(130) == 0.0  # past the end: clamped, never negative
    assert f(6, total=10, warmup=8, decay=0.5) == pytest.approx(4 / 5)  # overlap: the lower of 7/8 and (10 - 6) / 5
    assert f(0, warmup=0) == 1.0 and f(99, decay=0.0) == 1.0  # either ramp switched off
    assert f(10_000, total=None) == 1.0  # no known length: no decay


def test_resampling_gives_dead_latents_fresh_unit_directions():
    from core.sae import SAEConfig, SparseAutoencoder
    from core.sae_training import resample_dead_latents

    gen = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, k=2), generator=gen)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(64, 8, generator=gen)
    loss = sae(x)[0].pow(2).sum()
    loss.backward()
    opt.step()  # creates Adam state
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7]] = True
    before = sae.W_dec.detach().clone()
    resample_dead_latents(sae, opt, x, dead, gen)
    assert torch.equal(sae.W_dec[~dead], before[~dead])  # live latents untouched
    assert not torch.allclose(sae.W_dec[dead], before[dead])
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(2))
    assert (sae.b_enc[dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg"][dead] == 0).all() and (opt.state[sae.W_dec]["exp_avg"][~dead] != 0).any()


def test_dying_latents_stop_training_only_when_asked():
    from core.sae_training import DyingLatents

    batches = random_batches(n_batches=8)
    cfg = SAEConfig(d_in=8, d_sae=64, k=1)  # 64 latents, one active per row: most never fire
    with pytest.raises(DyingLatents) as err:
        train_sae(cfg, quick(dead_steps_threshold=2, dead_backoff=0.1), batches, init_sample=batches[0], progress=False)
    assert err.value.dead_fraction > 0.1 and err.value.step % 2 == 0  # checked every dead_steps_threshold steps
    _, h = train_sae(cfg, quick(dead_steps_threshold=2), batches, init_sample=batches[0], progress=False)
    assert h["dead_fraction"] > 0.1  # the same run goes to the end without dead_backoff


@pytest.mark.parametrize("arch", ["topk", "paper"])
def test_fused_optimiser_matches_reference_adam(monkeypatch, arch):
    """The trainer's fused Adam gives the weights a plain per-parameter Adam gives."""
    cfg = SAEConfig(d_in=8, d_sae=32, k=4, architecture=arch)
    batches = random_batches()

    def run(train):
        return train_sae(cfg, train, batches, init_sample=batches[0], progress=False)[0]

    train = quick(max_steps=5, autocast_bf16=False)
    fused = run(train)

    real_adam = torch.optim.Adam

    def reference_adam(params, lr, **_):  # textbook Adam: default betas and eps, one parameter at a time
        return real_adam(params, lr=lr, foreach=False)

    monkeypatch.setattr(torch.optim, "Adam", reference_adam)
    reference = run(train)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    start = run(quick(max_steps=1, lr=1e-12, autocast_bf16=False))
    assert not torch.allclose(fused.W_enc, start.W_enc, atol=1e-4)  # five steps moved the weights
