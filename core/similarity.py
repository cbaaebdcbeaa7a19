"""Step ``similarity``: how far each layer moved, pre-trained vs fine-tuned, on held-out texts.

For every hidden state index l (0 = embeddings, L = last block), on the test-split sample:

  cosine_of_means  cos(mu_pre, mu_ft) where mu = mean over examples of each example's
                   mean-pooled vector (paper 3.2.2: "activation values for each sample were
                   averaged, producing a single representative activation vector")
  mean_cosine      mean over examples of cos(pool_pre_i, pool_ft_i) (the paper's published code)
  token_cosine     mean over tokens of cos(h_pre_t, h_ft_t) (what the sentence explorer shows per token)
  cka              linear CKA between the token activation matrices [N, d] of both models
                   (Kornblith et al. 2019), computed exactly over all N evaluation tokens
                   from streamed d x d cross-covariances (biased estimator; N >> d keeps its bias small)

plus the (L+1) x (L+1) matrix cka_matrix[i][j] = CKA(pre layer i, ft layer j).
Mean-pooling includes [CLS]/[SEP] (as sentence-transformers does) and excludes padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.activations import ActivationStore, mean_pool
from core.errors import OptionCheck
from core.progress import progress_bar
from core.files import atomic_path, write_json
from core.runfolder import CKA_CSV, SIMILARITY_CSV, SIMILARITY_JSON, RunFolder, read_similarity


@dataclass
class SimilarityConfig:
    split: str = "test"  # which extracted sample to compare on ("test" or "train")

    def validate(self) -> None:
        OptionCheck("similarity", self).choice("split", "test", "train")


# ------------------------------------------------------------------ pure maths (tensors in, numbers out)
def cosine(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=dim, eps=1e-12)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of [n, d1] and [n, d2] (feature-space form, biased HSIC)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    xy = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(xy / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


class CrossCovariance:
    """Streams sum(x), sum(y), sum(x^T y) for CKA over more rows than fit in memory.

    Rows are shifted by a reference (the first batch's mean) before accumulating, which keeps
    the fp32 per-batch products accurate when activations have large means.
    """

    def __init__(self, n_a: int, n_b: int, d: int):
        self.n = 0
        self.ref_a = self.ref_b = None
        self.sum_a = torch.zeros(n_a, d, dtype=torch.float64)
        self.sum_b = torch.zeros(n_b, d, dtype=torch.float64)
        self.cross = torch.zeros(n_a, n_b, d, d, dtype=torch.float64)  # [layer_a, layer_b, d, d]
        self.self_a = torch.zeros(n_a, d, d, dtype=torch.float64)
        self.self_b = torch.zeros(n_b, d, d, dtype=torch.float64)

    def update(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """xs: per layer [n, d] of model a; ys: per layer [n, d] of model b (same tokens)."""
        if self.ref_a is None:
            self.ref_a = torch.stack([x.float().mean(0) for x in xs])
            self.ref_b = torch.stack([y.float().mean(0) for y in ys])
        xs = [x.float() - self.ref_a[i] for i, x in enumerate(xs)]
        ys = [y.float() - self.ref_b[j] for j, y in enumerate(ys)]
        self.n += xs[0].shape[0]
        for i, x in enumerate(xs):
            self.sum_a[i] += x.sum(0).double()
            self.self_a[i] += (x.T @ x).double()
        for j, y in enumerate(ys):
            self.sum_b[j] += y.sum(0).double()
            self.self_b[j] += (y.T @ y).double()
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                self.cross[i, j] += (x.T @ y).double()  # [d, d]

    def cka(self) -> np.ndarray:
        """[n_a, n_b] linear CKA between every layer pair."""
        ma, mb = self.sum_a / self.n, self.sum_b / self.n
        ca = self.self_a - self.n * ma[:, :, None] * ma[:, None, :]  # centred X^T X
        cb = self.self_b - self.n * mb[:, :, None] * mb[:, None, :]
        cab = self.cross - self.n * ma[:, None, :, None] * mb[None, :, None, :]  # centred X^T Y
        na = torch.linalg.matrix_norm(ca)  # [n_a]
        nb = torch.linalg.matrix_norm(cb)
        return (torch.linalg.matrix_norm(cab) ** 2 / (na[:, None] * nb[None, :])).numpy()


def compare_layers(store: ActivationStore, model_a: str = "pretrained", model_b: str = "finetuned", progress: bool = True) -> dict:
    """All similarity measures between two models' activations in one pass over the shards."""
    n_layers, d = store.num_layers, store.d_model
    pooled_a: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    pooled_b: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    tok_cos_sum = np.zeros(n_layers)
    cov = CrossCovariance(n_layers, n_layers, d)
    for s in progress_bar(range(store.index["num_shards"]), desc="similarity", unit="shard", show=progress):
        ex = store.meta(s)["example_ids"]
        xs = [store.layer(model_a, s, l).float() for l in range(n_layers)]  # [n, d] each
        ys = [store.layer(model_b, s, l).float() for l in range(n_layers)]
        cov.update(xs, ys)
        for l in range(n_layers):
            pooled_a[l].append(mean_pool(xs[l], ex).double())
            pooled_b[l].append(mean_pool(ys[l], ex).double())
            tok_cos_sum[l] += float(cosine(xs[l], ys[l]).sum())
    cka = cov.cka()
    rows = []
    for l in range(n_layers):
        pa, pb = torch.cat(pooled_a[l]), torch.cat(pooled_b[l])  # [examples, d]
        rows.append(
            {
                "layer": l,
                "cosine_of_means": float(cosine(pa.mean(0), pb.mean(0), dim=0)),
                "mean_cosine": float(cosine(pa, pb).mean()),
                "token_cosine": float(tok_cos_sum[l] / cov.n),
                "cka": float(cka[l, l]),
            }
        )
    return {"layers": rows, "cka_matrix": cka.tolist(), "num_tokens": cov.n, "num_examples": store.index["num_examples"], "split": store.split}


def cka_frame(matrix) -> pd.DataFrame:
    """The layer-pair CKA matrix as a table: rows pretrained_i, columns finetuned_j (cka_matrix.csv)."""
    n_pre, n_ft = len(matrix), len(matrix[0]) if len(matrix) else 0
    return pd.DataFrame(matrix, index=[f"pretrained_{i}" for i in range(n_pre)], columns=[f"finetuned_{j}" for j in range(n_ft)])


def run_similarity(run: RunFolder, cfg: SimilarityConfig) -> dict:
    result = compare_layers(ActivationStore(run, cfg.split))
    out = run.similarity_dir
    write_json(out / SIMILARITY_JSON, result)
    with atomic_path(out / SIMILARITY_CSV) as tmp:
        pd.DataFrame(result["layers"]).to_csv(tmp, index=False)
    with atomic_path(out / CKA_CSV) as tmp:
        cka_frame(result["cka_matrix"]).to_csv(tmp)
    return {"num_tokens": result["num_tokens"], "last_layer": result["layers"][-1]}


def load_similarity(run: RunFolder) -> dict:
    """similarity.json as the step wrote it (checked by ``read_similarity``)."""
    run.require("similarity", "the similarity report")
    return read_similarity(run.similarity_json)
