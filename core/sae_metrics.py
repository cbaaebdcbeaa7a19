"""Quality of a trained SAE over a stream of activation batches (one pass, constant memory).

All sums are float64. With ``N`` evaluation tokens of width ``d``:

* ``mse``   = sum_t ||x_t - x_hat_t||^2 / (N * d)            (raw activation units)
* ``fvu``   = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean||^2, ``mean`` over the same N tokens,
  with ``sum_t ||x_t - mean||^2 = sum_t ||x_t||^2 - ||sum_t x_t||^2 / N``
* ``l0``    = mean over tokens of the number of latents > 0
* ``dead_fraction``  = share of latents that are > 0 on no evaluation token
* ``dense_fraction`` = share of latents that are > 0 on more than ``dense_threshold`` of tokens
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from core.errors import LayerscopeError
from core.sae import SparseAutoencoder

EVAL_CHUNK_ROWS = 4096  # tokens encoded at a time (bounds the [rows, d_sae] buffers)


@torch.no_grad()
def _latent_counts(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat [n, d], firing count per latent [d_sae] int64) for raw ``x [n, d]``."""
    if sae.cfg.architecture == "topk":
        values, indices = sae.encode_sparse(x)  # [n, k]
        x_hat = sae.decode_sparse(values, indices)
        return x_hat, torch.bincount(indices[values > 0], minlength=sae.cfg.d_sae)
    x_hat, z = sae(x)  # z [n, d_sae]
    return x_hat, (z > 0).sum(0)


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, batches: Iterable[torch.Tensor], *, dense_threshold: float = 0.1) -> dict:
    """Stream ``batches`` of raw activations ``[n, d_in]`` through ``sae``; see module docstring.

    Returns ``mse``, ``fvu``, ``l0``, ``dead_fraction``, ``dense_fraction`` (floats) and
    ``num_tokens`` (int). ``fvu`` is NaN when all tokens are identical.
    """
    sae.eval()
    d, m = sae.cfg.d_in, sae.cfg.d_sae
    sse = sum_sq = 0.0
    sum_x = torch.zeros(d, dtype=torch.float64)  # [d]
    counts = torch.zeros(m, dtype=torch.long)  # [d_sae] tokens each latent fired on
    n = 0
    for batch in batches:
        # Work in row chunks: the [rows, d_sae] pre-activations of a whole shard would be a fresh
        # ~100 MB allocation per shard, and on virtual machines first touching fresh memory costs
        # more than the encoding itself (evaluation of a 49k-token split: 1.45 s -> 0.9 s).
        for x in batch.split(EVAL_CHUNK_ROWS):
            x = x.float()
            x_hat, c = _latent_counts(sae, x)
            sse += (x_hat - x).pow(2).sum(dtype=torch.float64).item()  # fp32 differences, float64 sums
            sum_sq += x.pow(2).sum(dtype=torch.float64).item()
            sum_x += x.sum(0, dtype=torch.float64)
            counts += c
            n += x.shape[0]
    if n == 0:
        raise LayerscopeError("no activations to evaluate the SAE on; extract activations for the evaluation split first")
    total_var = sum_sq - sum_x.pow(2).sum().item() / n
    density = counts.double() / n
    return {
        "mse": sse / (n * d),
        "fvu": sse / total_var if total_var > 0 else float("nan"),
        "l0": counts.sum().item() / n,
        "dead_fraction": (counts == 0).double().mean().item(),
        "dense_fraction": (density > dense_threshold).double().mean().item(),
        "num_tokens": n,
    }


@torch.no_grad()
def feature_density(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Fraction of tokens each latent is > 0 on -> ``[d_sae]`` float64."""
    sae.eval()
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    n = 0
    for batch in batches:
        for x in batch.split(EVAL_CHUNK_ROWS):
            counts += _latent_counts(sae, x.float())[1]
            n += x.shape[0]
    if n == 0:
        raise LayerscopeError("no activations to measure feature density on; extract activations first")
    return counts.double() / n
