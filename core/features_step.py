"""Step ``features``: rank every SAE's features, collect their top examples, match pre-trained to fine-tuned."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FeaturesConfig:
    top_k: int = 20  # top activating tokens kept per feature
    kept_threshold: float = 0.7  # matched decoder cosine at or above which a feature counts as kept
    shifted_threshold: float = 0.4  # below kept but at or above this: shifted; below: lost (pre) / new (fine-tuned)
