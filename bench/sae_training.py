"""SAE training: tokens/s of ``core.sae_training.train_sae`` against SAELens and a plain PyTorch loop.

Data: real activations, hidden state 3 of the pre-trained model (embedded MiniLM, d=384) on
2,000 IMDb train reviews extracted with the default preset (128 tokens), held in memory and
cut into the same shuffled ``[batch, 384]`` fp32 batches for every trainer, so only training
is timed (each trainer gets the same number of optimiser steps; tokens/s = steps x batch / s).

Measured, with the run's settings (m = 4 x 384 = 1536 latents):
* core TopK (k=32, bf16 encoder matmul, sparse backward, AuxK) at batch 4096 and at the run
  default 2048;
* core ``paper`` ReLU + L1 SAE (bf16 autocast) at batch 4096 (the paper preset's batch).

Baselines, measured in the same process:
* SAELens ``SAETrainer`` fed an iterator of the same tensors: ``TopKTrainingSAE`` for TopK and
  ``StandardTrainingSAE`` (ReLU + L1) for ``paper``, each in every setting it offers on CPU
  (fp32; bf16 autocast; TopK also fp32 with ``use_sparse_activations``). Its best setting,
  chosen at batch 4096, is the baseline, and is re-run at 2048 for the 2048 figure. Skipped,
  with a note, when sae-lens is not installed; the plain loop is the baseline then.
* a plain PyTorch loop: dense encoder/decoder, fp32, Adam (TopK via ``topk`` + ``scatter``).

Fraction of the bf16 matmul ceiling: the ceiling is the GFLOP/s of one
``[4096, 384] x [384, 1536]`` bf16 matmul timed in the same run. FLOPs per token, counted as a
dense trainer must do them (the sparse kernels do less, so this is "useful model FLOPs"):

    TopK:   encoder forward 2dm + encoder backward 4dm + sparse decoder forward+backward 6kd
    paper:  encoder 2dm + 4dm, dense decoder 2dm + 4dm = 12dm

Quality: the step's own path (``core.saes.train_one``: streamed shards, default settings, 3
epochs) run twice with the same seed, bf16 and fp32; FVU of each on the held-out test-split
activations (``core.sae_metrics.evaluate_sae``) must agree within 0.01.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from bench.common import Context, Section, bench_run, default_model_cfg, load_models, scratch_run, timeit

D, M, K, LAYER, MODEL = 384, 1536, 32, 3, "pretrained"


def flops_per_token(arch: str, d: int = D, m: int = M, k: int = K) -> int:
    return 6 * d * m + 6 * k * d if arch == "topk" else 12 * d * m


def matmul_ceiling(repeats: int = 30, n: int = 4096, d: int = D, m: int = M) -> dict:
    """GFLOP/s of an ``[n, d] x [d, m]`` matmul in bf16 and fp32 (median of ``repeats``)."""
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, m, dtype=dtype)
        t = timeit(lambda: a @ b, repeats=repeats, warmup=5)
        out[name] = {"gflops": 2 * n * d * m / t.median / 1e9, "seconds": t.median, "shape": [n, d, m]}
    return out


# ----------------------------------------------------------------------------- activations
def activation_run(ctx: Context):
    """Train + test activations of the bench run with the default preset's extraction settings (cached)."""
    from core.activations import ActivationsConfig, ActivationStore, extract_split
    from core.errors import LayerscopeError
    from core.runfolder import RunFolder

    base = bench_run(ctx, ctx.pick(21000, 300))
    n_train, n_test = ctx.pick(2000, 40), ctx.pick(400, 20)
    run = RunFolder(base.root.parent / f"{base.root.name}.acts_{n_train}_{n_test}")
    try:
        ActivationStore(run, "train"), ActivationStore(run, "test")
        return run
    except (LayerscopeError, FileNotFoundError):
        pass
    run = scratch_run(base, f"acts_{n_train}_{n_test}")
    models, tok = load_models(base)
    cfg = ActivationsConfig(sae_examples=n_train, eval_examples=n_test)
    for split, n in (("test", n_test), ("train", n_train)):
        extract_split(run, split, n, cfg, default_model_cfg(), models, tok)
    return run


def same_batches(x: torch.Tensor, batch: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` shuffled batches of ``batch`` rows (cycling over ``x`` if needed)."""
    if len(x) < batch:  # tiny inputs (--quick): repeat rows to fill one batch
        x = x.repeat(-(-batch // len(x)), 1)
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            out.append(x[perm[i : i + batch]].contiguous())
            if len(out) == steps:
                break
    return out


# ----------------------------------------------------------------------------- trainers
def core_trainer(arch: str, batches: list[torch.Tensor], init: torch.Tensor, bf16: bool = True):
    from core.sae import SAEConfig
    from core.sae_training import SAETrainingConfig, train_sae

    def fit():
        cfg = SAEConfig(d_in=D, d_sae=M, architecture=arch, k=K)
        tcfg = SAETrainingConfig(lr=4e-3 if arch == "topk" else 2e-5, batch_size=len(batches[0]), autocast_bf16=bf16, seed=0)
        return train_sae(cfg, tcfg, batches, init_sample=init, total_steps=len(batches), progress=False)

    return fit


def plain_trainer(arch: str, batches: list[torch.Tensor], l1: float = 1e-3):
    """The textbook loop: dense fp32 encoder/decoder, Adam; TopK keeps the k largest pre-activations."""

    def fit():
        g = torch.Generator().manual_seed(0)
        W_enc = torch.nn.Parameter(torch.randn(D, M, generator=g) / D**0.5)
        b_enc = torch.nn.Parameter(torch.zeros(M))
        W_dec = torch.nn.Parameter(W_enc.detach().t().clone())
        b_dec = torch.nn.Parameter(torch.zeros(D))
        opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-3)
        for x in batches:
            if arch == "topk":
                pre = (x - b_dec) @ W_enc + b_enc
                v, i = pre.topk(K, dim=1)
                z = torch.zeros_like(pre).scatter(1, i, F.relu(v))
                loss = (z @ W_dec + b_dec - x).pow(2).mean()
            else:
                z = F.relu(x @ W_enc + b_enc)
                loss = (z @ W_dec + b_dec - x).pow(2).mean() + l1 * z.abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return fit


def saelens_available() -> bool:
    try:
        import sae_lens  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


SAELENS_SETTINGS = {
    "topk": {"fp32": dict(autocast=False, sparse=False), "bf16 autocast": dict(autocast=True, sparse=False), "fp32 sparse activations": dict(autocast=False, sparse=True)},
    "paper": {"fp32": dict(autocast=False, sparse=False), "bf16 autocast": dict(autocast=True, sparse=False)},
}


def saelens_trainer(arch: str, batches: list[torch.Tensor], autocast: bool, sparse: bool):
    """SAELens's own training loop (``SAETrainer.fit``) over an iterator of our tensors."""
    import logging

    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    batch = len(batches[0])

    def fit():
        torch.manual_seed(0)
        if arch == "topk":
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K, dtype="float32", device="cpu", normalize_activations="none", use_sparse_activations=sparse))
            lr = 4e-3
        else:
            sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D, d_sae=M, l1_coefficient=1e-3, dtype="float32", device="cpu", normalize_activations="none"))
            lr = 2e-5
        cfg = SAETrainerConfig(total_training_samples=batch * len(batches), train_batch_size_samples=batch, lr=lr, lr_end=lr / 10, device="cpu", autocast=autocast, logger=LoggingConfig(log_to_wandb=False))
        trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(batches))
        _quiet_tqdm(trainer.fit)

    return fit


def _quiet_tqdm(fn):
    import os

    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def time_saelens(arch: str, batches: list[torch.Tensor], settings: dict, measure) -> tuple[dict, dict, str | None]:
    """Time SAELens in each of ``settings`` (name -> ``saelens_trainer`` keywords).

    ``measure(make)`` warms up and times ``make(steps)``, a trainer over the first ``steps``
    batches, and returns a timing dict with ``tokens_per_s``. A setting that raises (one SAELens
    cannot run on CPU) is recorded with its error, not fatal. Returns (timings by setting,
    errors by setting, the fastest setting or None when none ran: the plain loop is then the
    baseline, as without SAELens).
    """
    timed: dict = {}
    failed: dict = {}
    for name, kw in settings.items():
        try:
            timed[name] = measure(lambda s, kw=kw: saelens_trainer(arch, batches[:s], **kw))
        except Exception as e:  # noqa: BLE001 - a setting SAELens cannot run here is reported, not fatal
            failed[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    best = max(timed, key=lambda n: timed[n]["tokens_per_s"], default=None)
    return timed, failed, best


def add_trainer_figures(sec: Section, timings: dict, bf16_gflops: float) -> None:
    """Speed figures per ``"arch@batch"`` entry: vs SAELens's best setting (target 3x) when one
    ran, vs the plain loop (target 3x only when SAELens did not), and the fraction of the bf16
    matmul ceiling (target 0.40)."""
    for key, entry in timings.items():
        arch, batch = key.split("@")
        core_tps = entry["core"]["tokens_per_s"]
        label = {"topk": f"core TopK trainer (k={K}, bf16), batch {batch}", "paper": f"core paper ReLU+L1 trainer (bf16), batch {batch}"}[arch]
        best = entry.get("saelens_best")
        if best:
            sec.add(f"{label}, tokens/s", core_tps, "tok/s", entry["saelens"][best]["tokens_per_s"], f"SAELens {'TopK' if arch == 'topk' else 'standard'} SAE, best setting ({best})", target="ratio >= 3")
        sec.add(f"{label}, tokens/s vs plain loop", core_tps, "tok/s", entry["plain"]["tokens_per_s"], "plain PyTorch loop (dense, fp32, Adam)", target=None if best else "ratio >= 3")
        achieved = core_tps * flops_per_token(arch) / 1e9
        sec.add(f"{label}, fraction of bf16 matmul ceiling", achieved, "GFLOP/s", bf16_gflops, "bf16 matmul [4096,384]x[384,1536]", target="ratio >= 0.40",
                note=f"{flops_per_token(arch):,} FLOP/token ({'6dm + 6kd' if arch == 'topk' else '12dm'})")


# ----------------------------------------------------------------------------- the benchmark
def run(ctx: Context) -> Section:
    from core.activations import ActivationStore
    from core.sae_metrics import evaluate_sae
    from core.saes import SAEsConfig, train_one

    sec = Section("sae_training", __doc__.split("\n\n")[0])
    run_ = activation_run(ctx)
    train, test = ActivationStore(run_, "train"), ActivationStore(run_, "test")
    x = train.load_layer(MODEL, LAYER)  # [N, 384] fp32
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:20000]]
    steps = ctx.pick(24, 3)
    ceiling = matmul_ceiling(ctx.pick(30, 5))
    bf16_gflops = ceiling["bf16"]["gflops"]
    have_saelens = saelens_available()
    if not have_saelens:
        sec.notes.append("sae-lens is not installed: the SAELens baseline is skipped and the plain PyTorch loop is the baseline (pip install sae-lens to add it)")

    def tps(fn, batch: int) -> dict:
        t = timeit(fn, repeats=ctx.repeats, warmup=0)
        return {**t.as_dict(), "tokens_per_s": batch * steps / t.median}

    def warm(make):
        make(2)()  # warm-up: 2 steps (allocations, kernel choice)

    timings: dict = {}
    for arch, batch in (("topk", 4096), ("topk", 2048), ("paper", 4096)):
        batches = same_batches(x, batch, steps)
        key = f"{arch}@{batch}"
        entry = timings[key] = {"batch": batch, "steps": steps}
        warm(lambda s: core_trainer(arch, batches[:s], init))
        entry["core"] = tps(core_trainer(arch, batches, init), batch)
        warm(lambda s: plain_trainer(arch, batches[:s]))
        entry["plain"] = tps(plain_trainer(arch, batches), batch)
        if have_saelens:
            settings = SAELENS_SETTINGS[arch]
            best_4096 = timings.get("topk@4096", {}).get("saelens_best")
            if key == "topk@2048" and best_4096:  # the best setting found at 4096, at this batch size
                settings = {best_4096: settings[best_4096]}

            def measure(make, batch=batch):
                warm(make)
                return tps(make(steps), batch)

            entry["saelens"], entry["saelens_failed"], entry["saelens_best"] = time_saelens(arch, batches, settings, measure)
            for name, why in entry["saelens_failed"].items():
                sec.notes.append(f"SAELens {arch} setting '{name}' does not run on CPU here ({why[:90]}...); left out of its best")

    add_trainer_figures(sec, timings, bf16_gflops)

    # quality: the step's own training path, bf16 vs fp32, same seed and steps
    fvu = {}
    epochs = ctx.pick(3.0, 1.0)
    for name, bf16 in (("bf16", True), ("fp32", False)):
        cfg = SAEsConfig(epochs=epochs, training=dataclasses.replace(SAEsConfig().training, autocast_bf16=bf16))
        t0 = time.perf_counter()
        sae, hist = train_one(run_, cfg, MODEL, LAYER, train, f"bert.encoder.layer.{LAYER - 1}", progress=False)
        fvu[name] = {**evaluate_sae(sae, test.iter_layer(MODEL, LAYER)), "seconds": time.perf_counter() - t0, "steps": hist["num_steps"], "tokens_per_s_streaming": hist["tokens_per_second"]}
    sec.add("FVU of a bf16 TopK run (default settings, streamed shards)", fvu["bf16"]["fvu"], "", fvu["fp32"]["fvu"], "same run in fp32 (same seed and steps)", target="abs(value - baseline) <= 0.01",
            note=f"{fvu['bf16']['steps']} steps of 2048 tokens, FVU on {fvu['bf16']['num_tokens']:,} held-out test-split tokens")

    sec.details = {
        "activations": {"tokens": len(x), "layer": LAYER, "model": MODEL, "d": D, "d_sae": M, "k": K},
        "matmul_ceiling": ceiling,
        "flops_per_token": {"topk": flops_per_token("topk"), "paper": flops_per_token("paper"), "formula": "topk: 2dm (enc fwd) + 4dm (enc bwd) + 6kd (sparse dec fwd+bwd); paper: 12dm (dense enc+dec, fwd 2dm + bwd 4dm each)"},
        "trainers": timings,
        "quality": fvu,
    }
    return sec
