"""Per-feature statistics of SAE latents, and matching features across two SAEs. No file I/O.

Statistics are accumulated in one streaming pass (``FeatureStatsAccumulator``); tokens come in
``[n, d_sae]`` latent batches with the id of the example each token belongs to and that
example's class label (``-1`` = unlabelled: such tokens count everywhere except in
``mean_per_class`` and AUROC).

Matching (``match_features``) pairs the latents of SAE a (e.g. pre-trained) one-to-one with those
of SAE b (fine-tuned) by the Hungarian algorithm on decoder-direction cosine similarity,
optionally blended with the correlation of their activations on the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from core.errors import LayerscopeError

# ----------------------------------------------------------------------------- statistics


@dataclass
class FeatureStats:
    """Per-feature statistics over everything fed to a ``FeatureStatsAccumulator``."""

    num_tokens: int  # tokens seen
    num_examples: int  # distinct example ids seen
    mean: torch.Tensor  # [d_sae] float64 mean activation over tokens
    variance: torch.Tensor  # [d_sae] float64 population variance over tokens (the ranking used by the paper)
    density: torch.Tensor  # [d_sae] float64 fraction of tokens with activation > 0
    mean_per_class: torch.Tensor  # [d_sae, C] float64 mean activation over tokens of class-c examples (NaN: no tokens)
    class_token_counts: torch.Tensor  # [C] int64 tokens per class
    top_values: torch.Tensor  # [d_sae, top_k] float32 largest token activations, descending (several may share an example; 0 = unused)
    top_example_ids: torch.Tensor  # [d_sae, top_k] int64 example of each top token (-1 where top_values is 0)
    top_token_index: torch.Tensor  # [d_sae, top_k] int64 global token index in feeding order (-1 where unused)
    hist_edges: torch.Tensor  # [d_sae, bins + 1] float32 linear edges on [0, hi_f]; hi_f = smallest power of 2 >= max
    hist_counts: torch.Tensor  # [d_sae, bins] int64 counts of non-zero activations per bin (exact)
    selectivity_auroc: torch.Tensor  # [d_sae, C] float64 AUROC of example max activation, class c vs rest (NaN: undefined)


class FeatureStatsAccumulator:
    """Streaming per-feature statistics; call ``update`` per batch, then ``finalize``.

    Memory: besides O(d_sae * (C + top_k + bins)) state, the AUROC needs each example's max
    activation per feature, kept as float32 (exact: float16 tied maxima closer than 1e-3 and moved
    AUROCs by up to 0.07): ``4 * num_examples * d_sae`` bytes (12 MB for 2,000 examples x 1,536
    latents; 120 MB for 20,000; ranking them at the end takes four times that). Example ids
    should be small non-negative integers (row indices of the dataset): the table is indexed by id.

    Histogram: per feature, ``hist_bins`` linear bins on ``[0, hi_f]`` where ``hi_f`` starts as
    the smallest power of two >= the first non-zero activation seen; when a larger value arrives
    the range doubles by merging neighbouring bin pairs, so counts stay exact and the final range
    is the smallest power of two >= the feature's max (``hist_bins`` must be even).
    """

    def __init__(self, d_sae: int, num_classes: int, top_k: int = 20, hist_bins: int = 30):
        if hist_bins < 2 or hist_bins % 2:
            raise ValueError(f"hist_bins={hist_bins} must be an even number >= 2")
        if num_classes < 1 or top_k < 1:
            raise ValueError("num_classes and top_k must be >= 1")
        self.d_sae, self.num_classes, self.top_k, self.bins = d_sae, num_classes, top_k, hist_bins
        m, C = d_sae, num_classes
        self.n = 0
        self.mean = torch.zeros(m, dtype=torch.float64)  # [m] running mean (Chan et al. merge)
        self.m2 = torch.zeros(m, dtype=torch.float64)  # [m] running sum of squared deviations
        self.active = torch.zeros(m, dtype=torch.long)  # [m] tokens with activation > 0
        self.class_sum = torch.zeros(C, m, dtype=torch.float64)  # [C, m]
        self.class_tokens = torch.zeros(C, dtype=torch.long)  # [C]
        self.top_values = torch.zeros(m, 0)  # [m, <=top_k]
        self.top_tokens = torch.zeros(m, 0, dtype=torch.long)
        self.top_examples = torch.zeros(m, 0, dtype=torch.long)
        self.hist_hi = torch.zeros(m, dtype=torch.float64)  # [m] histogram range (0 = nothing seen)
        self.hist_counts = torch.zeros(m, hist_bins, dtype=torch.long)  # [m, bins]
        self.example_max = torch.zeros(0, m)  # [num_examples, m] float32
        self.example_label = torch.zeros(0, dtype=torch.long)  # [num_examples], -1 unlabelled
        self.example_seen = torch.zeros(0, dtype=torch.bool)  # [num_examples]

    @torch.no_grad()
    def update(self, latents: torch.Tensor, example_ids: torch.Tensor, labels_of_tokens: torch.Tensor) -> None:
        """Add ``latents [n, d_sae]`` (>= 0) of tokens from ``example_ids [n]`` with ``labels_of_tokens [n]``."""
        n, m = latents.shape
        if m != self.d_sae or example_ids.shape != (n,) or labels_of_tokens.shape != (n,):
            raise ValueError(
                f"expected latents [n, {self.d_sae}], example_ids [n], labels [n]; got "
                f"{tuple(latents.shape)}, {tuple(example_ids.shape)}, {tuple(labels_of_tokens.shape)}"
            )
        if n == 0:
            return
        if int(labels_of_tokens.max()) >= self.num_classes or int(example_ids.min()) < 0:
            raise ValueError("labels must be < num_classes and example ids >= 0")
        z = latents.detach().float()  # [n, m]
        ids, labels = example_ids.long(), labels_of_tokens.long()
        # The sums below run over the non-zero entries only (float64): SAE latents are sparse, so
        # this is O(active entries) where dense float64 arithmetic would be O(n * m).
        t, f = (z > 0).nonzero(as_tuple=True)  # [nnz] token and feature of every non-zero entry
        v = z[t, f].double()  # [nnz]
        self._moments(n, f, v)
        self._classes(labels, t, f, v)
        self._top(z, ids)
        self._histogram(z, f, v)
        self._example_max(z, ids, labels)
        self.n += n

    def _moments(self, n_b: int, f: torch.Tensor, v: torch.Tensor) -> None:
        m = self.d_sae
        count = torch.bincount(f, minlength=m)  # [m] non-zero entries per feature
        mean_b = torch.zeros(m, dtype=torch.float64).index_add_(0, f, v) / n_b  # [m]
        dev = v - mean_b[f]  # non-zero entries minus their feature's batch mean
        m2_b = torch.zeros(m, dtype=torch.float64).index_add_(0, f, dev * dev) + (n_b - count) * mean_b * mean_b  # each zero adds mean^2
        total = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)  # Chan et al.'s merge of two (count, mean, M2) summaries
        self.m2 += m2_b + delta.pow(2) * (self.n * n_b / total)
        self.active += count

    def _classes(self, labels: torch.Tensor, t: torch.Tensor, f: torch.Tensor, v: torch.Tensor) -> None:
        lab = labels[t]  # [nnz] class of each non-zero entry's example; -1 = unlabelled
        ok = lab >= 0
        self.class_sum.view(-1).index_add_(0, lab[ok] * self.d_sae + f[ok], v[ok])  # [C, m] flattened
        self.class_tokens += torch.bincount(labels[labels >= 0], minlength=self.num_classes)

    def _top(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        kb = min(self.top_k, z.shape[0])
        vals, rows = z.t().topk(kb, dim=1)  # [m, kb]
        vals = torch.cat([self.top_values, vals], 1)
        tokens = torch.cat([self.top_tokens, rows + self.n], 1)
        examples = torch.cat([self.top_examples, ids[rows]], 1)
        keep = min(self.top_k, vals.shape[1])
        self.top_values, j = vals.topk(keep, dim=1)  # [m, keep], descending
        self.top_tokens, self.top_examples = tokens.gather(1, j), examples.gather(1, j)

    def _histogram(self, z: torch.Tensor, f: torch.Tensor, v: torch.Tensor) -> None:
        bmax = z.amax(0).double()  # [m]
        new = (self.hist_hi == 0) & (bmax > 0)
        self.hist_hi[new] = torch.exp2(torch.ceil(torch.log2(bmax[new])))
        grow = bmax > self.hist_hi
        while grow.any():  # double the range of growing features by merging bin pairs
            merged = self.hist_counts[grow].view(-1, self.bins // 2, 2).sum(2)
            self.hist_counts[grow] = torch.cat([merged, torch.zeros_like(merged)], 1)
            self.hist_hi[grow] *= 2
            grow = bmax > self.hist_hi
        b = (v / self.hist_hi[f] * self.bins).long().clamp_(0, self.bins - 1)
        self.hist_counts.view(-1).index_add_(0, f * self.bins + b, torch.ones_like(b))

    def _example_max(self, z: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> None:
        need = int(ids.max()) + 1
        if need > self.example_max.shape[0]:
            size = max(need, 2 * self.example_max.shape[0])
            grown = torch.zeros(size, self.d_sae)
            grown[: self.example_max.shape[0]] = self.example_max
            self.example_max = grown
            self.example_label = torch.cat([self.example_label, torch.full((size - len(self.example_label),), -1)])
            self.example_seen = torch.cat([self.example_seen, torch.zeros(size - len(self.example_seen), dtype=torch.bool)])
        uniq, inv = ids.unique(return_inverse=True)
        rows = inv[:, None].expand(-1, self.d_sae)  # [n, m]
        batch_max = torch.zeros(len(uniq), self.d_sae).scatter_reduce_(0, rows, z.float(), "amax", include_self=False)
        self.example_max[uniq] = torch.maximum(self.example_max[uniq], batch_max)
        self.example_label[ids] = labels
        self.example_seen[uniq] = True

    def finalize(self) -> FeatureStats:
        if self.n == 0:
            raise LayerscopeError("no tokens were fed to the feature statistics; check the dataset split is not empty")
        top_values = self.top_values.clone()
        unused = top_values <= 0
        pad = self.top_k - top_values.shape[1]  # fewer tokens than top_k were fed
        fill = lambda t, v: torch.nn.functional.pad(t, (0, pad), value=v)  # noqa: E731
        edges = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)[None, :] * self.hist_hi[:, None]
        seen = self.example_seen.nonzero().squeeze(1)
        mean_per_class = (self.class_sum / self.class_tokens[:, None]).t().contiguous()  # 0/0 -> NaN
        return FeatureStats(
            num_tokens=self.n,
            num_examples=len(seen),
            mean=self.mean.clone(),
            variance=self.m2 / self.n,
            density=self.active.double() / self.n,
            mean_per_class=mean_per_class,
            class_token_counts=self.class_tokens.clone(),
            top_values=fill(top_values.clamp_min(0), 0.0),
            top_example_ids=fill(self.top_examples.masked_fill(unused, -1), -1),
            top_token_index=fill(self.top_tokens.masked_fill(unused, -1), -1),
            hist_edges=edges.float(),
            hist_counts=self.hist_counts.clone(),
            selectivity_auroc=auroc_per_class(self.example_max[seen], self.example_label[seen], self.num_classes),
        )


def auroc_per_class(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """AUROC of ``scores [E, F]`` for class c vs rest -> ``[F, C]`` float64.

    Mann-Whitney U with average ranks for ties, which equals ``sklearn.metrics.roc_auc_score``
    and is vectorised over features. Examples with label -1 are dropped; NaN where class c has
    no positives or no negatives.
    """
    keep = labels >= 0
    s = scores[keep].double().numpy()
    y = labels[keep].numpy()
    out = np.full((s.shape[1], num_classes), np.nan)
    if len(y) == 0:
        return torch.from_numpy(out)
    ranks = rankdata(s, axis=0)  # [E, F], ties get their average rank
    for c in range(num_classes):
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            out[:, c] = (ranks[pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return torch.from_numpy(out)


def rank_features(stats: FeatureStats, by: str = "variance", class_index: int | None = None) -> torch.Tensor:
    """Feature indices ``[d_sae]`` (LongTensor), best first; ties keep index order.

    ``by="variance"`` or ``"density"``: descending. ``by="selectivity"``: ``max_c |AUROC_c - 0.5|``
    descending, or with ``class_index`` the signed ``AUROC_c - 0.5`` (features that fire more on
    that class first). Undefined AUROCs (NaN) rank last.
    """
    if by == "variance":
        score = stats.variance
    elif by == "density":
        score = stats.density
    elif by == "selectivity":
        auc = stats.selectivity_auroc
        if class_index is None:
            score = (auc - 0.5).abs().nan_to_num(nan=-1.0).amax(1)
        elif 0 <= class_index < auc.shape[1]:
            score = (auc[:, class_index] - 0.5).nan_to_num(nan=-1.0)
        else:
            raise LayerscopeError(f"class_index={class_index} is out of range; the dataset has {auc.shape[1]} classes")
    else:
        raise LayerscopeError(f"unknown ranking {by!r}; use 'variance', 'selectivity' or 'density'")
    return torch.sort(score, descending=True, stable=True).indices


# ----------------------------------------------------------------------------- matching

KEPT, SHIFTED, LOST, NEW, DEAD = "kept", "shifted", "lost", "new", "dead"


@dataclass
class MatchResult:
    """One-to-one matching of the features of SAE a onto those of SAE b.

    Per feature: ``partner_of_a [m_a]`` / ``partner_of_b [m_b]`` (index in the other SAE, -1 if
    unassigned), ``similarity_of_a`` / ``similarity_of_b`` (the similarity used for the decision,
    NaN if unassigned), ``status_of_a`` in {kept, shifted, lost, dead}, ``status_of_b`` in
    {kept, shifted, new, dead}. A pair below ``shifted_threshold`` keeps its partner entries (so a
    UI can show the nearest assignment) but is lost on a's side and new on b's side.

    Fractions: ``kept``, ``shifted``, ``lost`` are shares of a's alive features (they sum to 1);
    ``new`` is the share of b's alive features with no kept/shifted partner
    (so ``counts['kept'] + counts['shifted'] + counts['new'] == alive_b``).
    """

    partner_of_a: np.ndarray
    partner_of_b: np.ndarray
    similarity_of_a: np.ndarray
    similarity_of_b: np.ndarray
    status_of_a: np.ndarray
    status_of_b: np.ndarray
    counts: dict = field(default_factory=dict)  # kept, shifted, lost, new, alive_a, alive_b, dead_a, dead_b
    kept: float = 0.0
    shifted: float = 0.0
    lost: float = 0.0
    new: float = 0.0

    def describe(self, i: int, name_a: str = "pretrained", name_b: str = "finetuned") -> str:
        """E.g. ``"feature 12 in pretrained ↔ feature 873 in finetuned, cos 0.83, kept"``."""
        j = int(self.partner_of_a[i])
        if j < 0:
            return f"feature {i} in {name_a}: no partner in {name_b}, {self.status_of_a[i]}"
        return f"feature {i} in {name_a} ↔ feature {j} in {name_b}, cos {self.similarity_of_a[i]:.2f}, {self.status_of_a[i]}"


def _as_numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def _unit_rows(w: np.ndarray) -> np.ndarray:
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def _correlation(acts_a: np.ndarray, acts_b: np.ndarray) -> np.ndarray:
    """Pearson correlation of columns ``[n, m_a]`` x ``[n, m_b]`` -> ``[m_a, m_b]`` (0 for constant columns)."""
    a = acts_a - acts_a.mean(0)
    b = acts_b - acts_b.mean(0)
    a /= np.where((na := np.linalg.norm(a, axis=0)) > 0, na, np.inf)
    b /= np.where((nb := np.linalg.norm(b, axis=0)) > 0, nb, np.inf)
    return a.T @ b


def _pair_similarity(wa: np.ndarray, wb: np.ndarray, ia: np.ndarray, ib: np.ndarray, acts_a, acts_b, alpha: float) -> np.ndarray:
    """[len(ia), len(ib)] similarity of the alive features ``ia`` of a and ``ib`` of b: decoder
    cosine, blended with activation correlation on the same tokens when ``alpha > 0``."""
    sim = _unit_rows(wa[ia]) @ _unit_rows(wb[ib]).T  # [alive_a, alive_b]
    if alpha == 0:
        return sim
    if acts_a is None or acts_b is None:
        raise LayerscopeError("alpha > 0 blends in activation correlation; pass acts_a and acts_b (or alpha=0)")
    xa, xb = _as_numpy(acts_a), _as_numpy(acts_b)  # [n, m_a], [n, m_b]
    if xa.shape[0] != xb.shape[0] or xa.shape[1] != len(wa) or xb.shape[1] != len(wb):
        raise LayerscopeError(f"acts_a {xa.shape} and acts_b {xb.shape} must be latents of both SAEs on the same tokens")
    return (1 - alpha) * sim + alpha * _correlation(xa[:, ia], xb[:, ib])


def match_features(
    W_dec_a,
    W_dec_b,
    *,
    acts_a=None,
    acts_b=None,
    alpha: float = 0.0,
    kept_threshold: float = 0.7,
    shifted_threshold: float = 0.4,
    alive_a=None,
    alive_b=None,
) -> MatchResult:
    """Match decoder directions ``W_dec_a [m_a, d]`` to ``W_dec_b [m_b, d]`` one-to-one.

    Similarity = ``(1 - alpha) * cos(W_dec_a[i], W_dec_b[j]) + alpha * corr(acts_a[:, i], acts_b[:, j])``
    where ``acts_a [n, m_a]`` / ``acts_b [n, m_b]`` are latents on the same n tokens (needed iff
    alpha > 0). Features whose ``alive_a`` / ``alive_b`` mask entry is False are left out of the
    assignment and get status "dead". Among alive features, ``linear_sum_assignment`` maximises
    total similarity; when the alive counts differ, the surplus of a is "lost" and of b "new".
    Each assigned pair is "kept" if similarity >= kept_threshold, "shifted" if >=
    shifted_threshold, else a's feature is "lost" and b's "new". Accepts tensors or arrays.
    """
    wa, wb = _as_numpy(W_dec_a), _as_numpy(W_dec_b)
    if wa.ndim != 2 or wb.ndim != 2 or wa.shape[1] != wb.shape[1]:
        raise LayerscopeError(
            f"decoders of shape {wa.shape} and {wb.shape} cannot be matched; compare SAEs of the same layer width"
        )
    if not 0 <= alpha <= 1 or not shifted_threshold <= kept_threshold:
        raise LayerscopeError("need 0 <= alpha <= 1 and shifted_threshold <= kept_threshold; fix the matching options")
    ma, mb = len(wa), len(wb)
    alive_a = np.ones(ma, bool) if alive_a is None else _as_numpy(alive_a).astype(bool)
    alive_b = np.ones(mb, bool) if alive_b is None else _as_numpy(alive_b).astype(bool)
    ia, ib = np.flatnonzero(alive_a), np.flatnonzero(alive_b)

    sim = _pair_similarity(wa, wb, ia, ib, acts_a, acts_b, alpha)  # [alive_a, alive_b]
    rows, cols = linear_sum_assignment(sim, maximize=True)

    partner_a, partner_b = np.full(ma, -1), np.full(mb, -1)
    sim_a, sim_b = np.full(ma, np.nan), np.full(mb, np.nan)
    status_a = np.where(alive_a, LOST, DEAD).astype(object)
    status_b = np.where(alive_b, NEW, DEAD).astype(object)
    a_idx, b_idx, s = ia[rows], ib[cols], sim[rows, cols]
    partner_a[a_idx], partner_b[b_idx] = b_idx, a_idx
    sim_a[a_idx], sim_b[b_idx] = s, s
    pair_status = np.where(s >= kept_threshold, KEPT, np.where(s >= shifted_threshold, SHIFTED, LOST))
    status_a[a_idx] = pair_status
    status_b[b_idx] = np.where(pair_status == LOST, NEW, pair_status)

    counts = {
        KEPT: int((status_a == KEPT).sum()),
        SHIFTED: int((status_a == SHIFTED).sum()),
        LOST: int((status_a == LOST).sum()),
        NEW: int((status_b == NEW).sum()),
        "alive_a": len(ia),
        "alive_b": len(ib),
        "dead_a": ma - len(ia),
        "dead_b": mb - len(ib),
    }
    frac = lambda c, total: c / total if total else float("nan")  # noqa: E731
    return MatchResult(
        partner_of_a=partner_a,
        partner_of_b=partner_b,
        similarity_of_a=sim_a,
        similarity_of_b=sim_b,
        status_of_a=status_a.astype(str),
        status_of_b=status_b.astype(str),
        counts=counts,
        kept=frac(counts[KEPT], len(ia)),
        shifted=frac(counts[SHIFTED], len(ia)),
        lost=frac(counts[LOST], len(ia)),
        new=frac(counts[NEW], len(ib)),
    )
