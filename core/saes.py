"""Step ``saes``: one sparse autoencoder per (model, layer), trained on streamed token activations."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SAEsConfig:
    layers: list[int] = field(default_factory=list)  # hidden-state indices; [] = every block (1..L) for <= 8 layers, else the paper's 3, 6, L
    architecture: str = "topk"  # "topk" (default) or "paper" (ReLU + L1, the paper's recipe)
    expansion_factor: int = 4  # d_sae = expansion_factor * d_model (paper: 1024 for 768, i.e. 4/3)
    d_sae: int = 0  # explicit dictionary size; 0 = use expansion_factor
    k: int = 32  # TopK: active latents per token
    l1_coefficient: float = 1e-3  # paper: lambda of the L1 penalty
    input: str = "tokens"  # "tokens" (default) or "mean_pooled" (what the paper's code trained on)
