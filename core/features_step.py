"""Step ``features``: what every SAE feature responds to, and which features fine-tuning kept.

Per SAE, on the held-out test-split tokens:
  * statistics (``core.features``): variance (the paper's ranking), density, mean activation
    per class, label selectivity (AUROC of each example's max activation, class vs rest),
    top activating tokens and a histogram of non-zero activations;
  * for each feature's top tokens, a window of context tokens with the feature's activation
    on each, so the dashboard can highlight them in their text;
  * how far fine-tuning moved each feature: the mean over tokens of ``|z_ft - z_pre|``, the SAE
    applied to both models' hidden states (the ``change`` ranking);
  * for the fine-tuned model, each feature's effect on the classifier's logits, estimated by
    attribution patching: the feature's first-order contribution to logit c,
    ``effect[f, c] = mean_examples sum_tokens a_f(t) * (scale * W_dec[f]) . d logit_c / d h_t``;
    ablating the feature lowers the logit by about this much (positive = the feature supports
    class c; a linear approximation of the ablation effect, exact for a linear read-out).
Per layer, the pre-trained and fine-tuned SAEs' features are matched one-to-one (Hungarian
assignment on decoder cosine) and labelled kept / shifted / lost / new.

Files: ``features/<model>/layer_<i>/stats.safetensors`` and ``features/matching/layer_<i>.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.activations import ActivationStore
from core.data import load_split, stratified_sample
from core.errors import LayerscopeError, OptionCheck, StatsUnreadable
from core.features import FeatureStats, FeatureStatsAccumulator, match_features, rank_features
from core.models import encode, hidden_state_module, load_classifier, load_model_config, load_tokenizer, pad_batch, run_labels
from core.progress import progress_bar
from core.files import atomic_path, refuse_unreadable, write_json
from core.runfolder import MATCHING_FIELDS, MODELS, NO_SIMILARITY, OTHER_MODEL, RunFolder, core_command, match_similarity, read_json
from core.sae import SparseAutoencoder
from core.sae_metrics import EVAL_CHUNK_ROWS, feature_density
from core.saes import load_sae
from core.threads import run_side_by_side

MAX_CONTEXT_TOKENS = 5_000  # features.top_k x (2 x window + 1): ~1 GB for 24,576 latents, where 10 x 17 takes 34 MB
STAT_FIELDS = ("mean", "variance", "density", "mean_per_class", "class_token_counts", "top_values", "top_example_ids", "top_token_index", "hist_edges", "hist_counts", "selectivity_auroc")


@dataclass
class FeaturesConfig:
    top_k: int = 10  # top activating tokens kept per feature
    window: int = 8  # context tokens kept on each side of a top token
    kept_threshold: float = 0.7  # matched decoder cosine at or above which a feature counts as kept
    shifted_threshold: float = 0.4  # below kept but at or above this: shifted; below: lost (pre) / new (fine-tuned)
    effect_examples: int = 64  # test texts used to estimate logit effects (0 = skip)
    seed_baseline: bool = True  # also match the pre-trained SAE against one retrained with another seed: the noise floor of matching
    workers: int = field(default=2, metadata={"execution_only": True})  # SAEs processed side by side, each on its share of torch's threads (1 = one after another; same results)

    def validate(self) -> None:
        check = OptionCheck("features", self)
        check.at_least(1, "top_k", "workers")
        check.at_least(0, "window", "effect_examples")
        check.at_most(1000, "top_k", why="top examples kept per feature")
        check.at_most(512, "window", why="tokens of context on each side: no more than a text holds")
        check.at_most(10**6, "effect_examples")
        if self.top_k * (2 * self.window + 1) > MAX_CONTEXT_TOKENS:  # kept for every feature: ~8 bytes each
            check.fail("top_k", f"at most {MAX_CONTEXT_TOKENS // (2 * self.window + 1):,} with features.window={self.window}: top_k x (2 x window + 1) context tokens are kept for every feature (at most {MAX_CONTEXT_TOKENS:,}; default {10 * 17})")
        check.fraction("kept_threshold", "shifted_threshold")
        if self.shifted_threshold > self.kept_threshold:
            check.fail("shifted_threshold", f"at most features.kept_threshold ({self.kept_threshold})")


# ------------------------------------------------------------------ computing
@torch.no_grad()
def _latent_chunks(sae: SparseAutoencoder, store: ActivationStore, model: str, layer: int):
    """Dense latents ``[rows, d_sae]`` of the split's tokens in order, ``EVAL_CHUNK_ROWS`` tokens at a time
    (a whole shard at once would be a fresh ~100 MB buffer per shard: see ``core.sae_metrics``)."""
    for s in range(store.index["num_shards"]):
        for x in store.layer(model, s, layer).split(EVAL_CHUNK_ROWS):
            yield s, sae.encode(x.float())  # [rows, d_sae]


def feature_stats(sae: SparseAutoencoder, store: ActivationStore, model: str, layer: int, labels_by_id: dict, num_classes: int, top_k: int) -> tuple[FeatureStats, torch.Tensor, torch.Tensor]:
    """Stream the test tokens through the SAE. Returns the stats, the example id of every local
    example index, and ``change [d_sae]``: the mean over the tokens of ``|z_ft - z_pre|``, the SAE
    applied to both models' hidden states of the same tokens (how far fine-tuning moved each
    feature; the ``change`` ranking). Both models' shards hold the same tokens in the same order."""
    meta = store.all_meta()
    ids = meta["example_ids"].long()
    uniq, local = torch.unique(ids, return_inverse=True)  # example ids -> 0..E-1
    label_of_example = torch.tensor([labels_by_id[int(i)] for i in uniq])
    acc = FeatureStatsAccumulator(sae.cfg.d_sae, num_classes, top_k=top_k)
    other = OTHER_MODEL[model]
    change = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)  # [d_sae] running sum of |z_other - z|
    start = 0
    for (_, z), (_, z_other) in zip(_latent_chunks(sae, store, model, layer), _latent_chunks(sae, store, other, layer)):
        n = len(z)
        acc.update(z, local[start : start + n], label_of_example[local[start : start + n]])
        change += (z_other - z).abs().sum(0, dtype=torch.float64)
        start += n
    return acc.finalize(), uniq, change / max(start, 1)


@torch.no_grad()
def context_windows(sae: SparseAutoencoder, store: ActivationStore, model: str, layer: int, top_token_index: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [m, K, 2w+1] (-1 = outside the text) and the feature's activation on each."""
    meta = store.all_meta()
    ex, tok = meta["example_ids"], meta["token_ids"]
    m, k = top_token_index.shape
    offsets = torch.arange(-window, window + 1)
    idx = top_token_index[:, :, None] + offsets  # [m, K, W] global token indices
    valid = (top_token_index[:, :, None] >= 0) & (idx >= 0) & (idx < len(tok))
    idx_c = idx.clamp(0, len(tok) - 1)
    centre_ex = ex[top_token_index.clamp_min(0)][:, :, None]
    valid &= ex[idx_c] == centre_ex  # stay inside the same text
    token_ids = torch.where(valid, tok[idx_c].long(), torch.full_like(idx_c, -1))
    acts = torch.zeros(m, k, idx.shape[-1])
    feat = torch.arange(m)[:, None, None].expand_as(idx_c)
    flat_tok, flat_feat, flat_valid = idx_c.reshape(-1), feat.reshape(-1), valid.reshape(-1)
    order = torch.argsort(flat_tok)
    start = 0
    for _, z in _latent_chunks(sae, store, model, layer):
        end = start + len(z)
        sel = order[(flat_tok[order] >= start) & (flat_tok[order] < end)]
        acts.view(-1)[sel] = z[flat_tok[sel] - start, flat_feat[sel]]
        start = end
    acts.view(-1)[~flat_valid] = 0
    return token_ids.int(), acts.half()


def logit_effects(run: RunFolder, saes: dict[int, SparseAutoencoder], n_examples: int, max_length: int, truncation: str) -> dict[int, torch.Tensor]:
    """{layer: [d_sae, C]} attribution-patching estimate of each feature's effect on each logit
    (fine-tuned model), for the fine-tuned SAEs ``saes`` ({layer: SAE}) all at once, averaged over
    ``n_examples`` test texts drawn with every class in proportion (``stratified_sample``).

    Per batch of texts: one forward pass with the hidden states of every SAE layer captured, then
    one backward pass per class from that class's logits down to the lowest SAE layer only. The
    weights are frozen (no parameter gradients) and the lowest captured hidden state is made the
    leaf of the graph, so nothing below it is differentiated.
    """
    if not saes:
        return {}
    model = load_classifier(str(run.model_dir("finetuned"))).eval().requires_grad_(False)
    tok = load_tokenizer(str(run.model_dir("finetuned")))
    texts = stratified_sample(load_split(run, "test"), n_examples)["text"].tolist()
    ids = encode(tok, texts, max_length, truncation)
    layers = sorted(saes)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(_m, _i, output):
            h = output[0] if isinstance(output, tuple) else output  # [B, T, d]
            if layer == layers[0]:  # the leaf: gradients flow down to here and no further
                h = h.detach().requires_grad_(True)
                captured[layer] = h
                return (h, *output[1:]) if isinstance(output, tuple) else h
            captured[layer] = h
            return None

        return hook

    handles = [hidden_state_module(model, layer)[1].register_forward_hook(capture(layer)) for layer in layers]
    C = model.config.num_labels
    effects = {layer: torch.zeros(saes[layer].cfg.d_sae, C, dtype=torch.float64) for layer in layers}
    directions = {layer: sae.W_dec.detach() * sae.cfg.normalization_scale for layer, sae in saes.items()}  # [d_sae, d] raw units
    try:
        for lo in range(0, len(ids), 16):
            input_ids, mask = pad_batch(ids[lo : lo + 16], tok.pad_token_id)
            with torch.enable_grad():
                logits = model(input_ids=input_ids, attention_mask=mask).logits  # [B, C]
            keep = mask.bool()
            hs = [captured[layer] for layer in layers]
            with torch.no_grad():
                z = {layer: saes[layer].encode(h.detach()[keep].float()) for layer, h in zip(layers, hs)}  # [n, d_sae]
            for c in range(C):
                grads = torch.autograd.grad(logits[:, c].sum(), hs, retain_graph=c + 1 < C)  # each [B, T, d]
                for layer, g in zip(layers, grads):
                    g = g[keep].float()  # [n, d]
                    effects[layer][:, c] += (z[layer] * (g @ directions[layer].T)).sum(0).double()  # [d_sae]
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (e / max(len(ids), 1)).float() for layer, e in effects.items()}


def run_features(run: RunFolder, cfg: FeaturesConfig, progress: bool = True) -> dict:
    from core.config import saved_config  # core.config imports this module

    model_cfg = saved_config(run).to_dict()["model"]
    store = ActivationStore(run, "test")
    test = load_split(run, "test")
    labels_by_id = dict(zip(test["id"].astype(int), test["label"].astype(int)))
    num_classes = len(run_labels(run, load_model_config(str(run.model_dir("finetuned"))).num_labels))
    saes = run.sae_dirs()
    if not saes:
        raise LayerscopeError(f"no SAEs in {run.root}; run `{core_command('build', run.root, '--until', 'saes')}` first")
    effects = {}
    if cfg.effect_examples:  # every fine-tuned SAE from the same forward and backward passes
        ft_saes = {layer: load_sae(run, model, layer) for model, layer, _ in saes if model == "finetuned"}
        effects = logit_effects(run, ft_saes, cfg.effect_examples, model_cfg["max_length"], model_cfg["truncation"])
    def stats_job(item) -> None:
        model, layer, _ = item
        sae = load_sae(run, model, layer)
        stats, example_ids, change = feature_stats(sae, store, model, layer, labels_by_id, num_classes, cfg.top_k)
        win_tokens, win_acts = context_windows(sae, store, model, layer, stats.top_token_index, cfg.window)
        tensors = {f: getattr(stats, f).contiguous() for f in STAT_FIELDS}
        tensors["top_example_ids"] = torch.where(stats.top_example_ids >= 0, example_ids[stats.top_example_ids.clamp_min(0)], -1)
        tensors.update(window_token_ids=win_tokens.contiguous(), window_activations=win_acts.contiguous())
        tensors["change"] = change
        if model == "finetuned" and layer in effects:
            tensors["logit_effect"] = effects[layer].contiguous()
        with atomic_path(run.feature_stats_path(model, layer)) as tmp:
            save_file({k: v.float() if v.dtype == torch.float64 else v for k, v in tensors.items()}, str(tmp), metadata={"num_tokens": str(stats.num_tokens), "num_examples": str(stats.num_examples)})

    with progress_bar(total=len(saes), desc="features", unit="sae", show=progress) as bar:
        for _ in run_side_by_side(stats_job, saes, cfg.workers):
            bar.update()

    matching = []
    layers = [l for l in sorted({l for _, l, _ in saes}) if all(run.sae_dir(m, l).is_dir() for m in MODELS)]
    twins = {}  # layer -> the pre-trained SAE retrained with another seed
    if cfg.seed_baseline:
        jobs = run_side_by_side(lambda layer: seed_twin(run, layer), layers, cfg.workers)
        twins = dict(progress_bar(jobs, total=len(layers), desc="seed baselines", unit="sae", show=progress))
    for layer in layers:
        pre, ft = load_sae(run, "pretrained", layer), load_sae(run, "finetuned", layer)
        alive = [_stats_of(run, m, layer)["density"] > 0 for m in MODELS]
        res = match_features(pre.W_dec.detach(), ft.W_dec.detach(), kept_threshold=cfg.kept_threshold, shifted_threshold=cfg.shifted_threshold, alive_a=alive[0], alive_b=alive[1])
        summary = {"layer": layer, "kept": res.kept, "shifted": res.shifted, "new": res.new, "lost": res.lost, "counts": res.counts, "kept_threshold": cfg.kept_threshold, "shifted_threshold": cfg.shifted_threshold}
        if cfg.seed_baseline:
            twin_alive = feature_density(twins[layer], store.iter_layer("pretrained", layer)) > 0  # dead latents left out, as above
            base = match_features(pre.W_dec.detach(), twins[layer].W_dec.detach(), kept_threshold=cfg.kept_threshold, shifted_threshold=cfg.shifted_threshold, alive_a=alive[0], alive_b=twin_alive)
            summary.update({f"baseline_{k}": getattr(base, k) for k in ("kept", "shifted", "new", "lost")})
        write_json(run.matching_path(layer), {**summary, "partner_of_pretrained": res.partner_of_a, "partner_of_finetuned": res.partner_of_b, "similarity_of_pretrained": np.nan_to_num(res.similarity_of_a, nan=NO_SIMILARITY), "similarity_of_finetuned": np.nan_to_num(res.similarity_of_b, nan=NO_SIMILARITY), "status_of_pretrained": res.status_of_a.tolist(), "status_of_finetuned": res.status_of_b.tolist()})
        matching.append(summary)
    return {"matching": matching}


def seed_twin(run: RunFolder, layer: int) -> SparseAutoencoder:
    """The pre-trained SAE of ``layer`` retrained on the same activations with another seed.

    Two SAEs of the *same* activations already disagree on many features; fractions of
    pre-trained vs fine-tuned matching mean something only where they differ from the matching
    of the pre-trained SAE against this twin: the noise floor.
    """
    import dataclasses

    from core.config import saved_config
    from core.saes import train_one

    saes_cfg = saved_config(run).saes
    own = load_sae(run, "pretrained", layer).cfg
    # the shape of the SAE itself: a layer left from an earlier saes step with other settings
    # (saes --layers 6 --set saes.k=16 keeps layers 1-5 at their k) gets a twin of its own kind
    shape = {"architecture": own.architecture, "d_sae": own.d_sae, "k": own.k, "l1_coefficient": own.l1_coefficient, "input": own.input}
    twin_cfg = dataclasses.replace(saes_cfg, **shape, training=dataclasses.replace(saes_cfg.training, seed=saes_cfg.training.seed + 7777))
    twin, _ = train_one(run, twin_cfg, "pretrained", layer, ActivationStore(run, "train"), own.hook_name, progress=False)
    return twin


# ------------------------------------------------------------------ reading back (dashboard, analyze)
def load_stats(run: RunFolder, model: str, layer: int) -> dict[str, torch.Tensor]:
    """The features step's tensors for one SAE (cached in memory until the file changes), once
    that step has finished: the files of a step marked not done describe SAEs retrained since
    (``saes --force`` marks it not done) or a redo cut short."""
    run.require("features", "reading feature statistics")
    return _stats_of(run, model, layer)


def _stats_of(run: RunFolder, model: str, layer: int) -> dict[str, torch.Tensor]:
    """``load_stats`` without the check that the step has finished (the step itself reads them)."""
    path = run.feature_stats_path(model, layer)
    if not path.is_file():
        raise LayerscopeError(f"no feature statistics for {model} layer {layer}; re-run `{core_command('features', run.root, '--force')}`")
    try:
        return _load_stats_file(str(path), path.stat().st_mtime_ns, len(run.labels()), core_command("features", run.root, "--force"))
    except StatsUnreadable:
        # a class count that disagrees may be labels.json's fault (replaced since the build), not
        # the statistics file's: then that file is named, with its own fix
        run_labels(run, load_model_config(str(run.model_dir("finetuned"))).num_labels)
        raise


@lru_cache(maxsize=64)
def _load_stats_file(path: str, mtime_ns: int, num_classes: int, redo: str) -> dict[str, torch.Tensor]:
    """The tensors of one statistics file, checked: StatsUnreadable naming ``redo`` (the command
    that writes it again) when it is truncated, lacks a field, or its shapes disagree."""
    refuse_unreadable(path, StatsUnreadable)
    try:
        s = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise StatsUnreadable(f"{path} is truncated or not a safetensors file ({e}); re-run `{redo}`") from None
    missing = [f for f in STAT_FIELDS if f not in s]
    if missing:
        raise StatsUnreadable(f"{path} lacks {', '.join(missing)}; re-run `{redo}`")
    m, k, bins = len(s["mean"]), s["top_values"].shape[-1], s["hist_counts"].shape[-1]
    window = s["window_token_ids"].shape[-1] if "window_token_ids" in s else 0
    expected = {  # field -> shape, from the number of latents, classes, top tokens, bins and context window
        "mean": (m,), "variance": (m,), "density": (m,), "change": (m,),
        "mean_per_class": (m, num_classes), "selectivity_auroc": (m, num_classes), "class_token_counts": (num_classes,), "logit_effect": (m, num_classes),
        "top_values": (m, k), "top_example_ids": (m, k), "top_token_index": (m, k), "window_token_ids": (m, k, window), "window_activations": (m, k, window),
        "hist_edges": (m, bins + 1), "hist_counts": (m, bins),
    }
    for field, shape in expected.items():
        if field in s and tuple(s[field].shape) != shape:
            raise StatsUnreadable(
                f"{path}: {field} has shape {tuple(s[field].shape)}, not {shape} "
                f"({m} latents, {num_classes} classes as in the run's labels); re-run `{redo}`"
            )
    return s


def ranking(run: RunFolder, model: str, layer: int, by: str = "variance", class_index: int | None = None) -> torch.Tensor:
    s = load_stats(run, model, layer)
    if by == "change":  # mean |z_ft - z_pre| (``feature_stats``), largest first
        if "change" not in s:
            raise LayerscopeError(f"the feature statistics of {model} layer {layer} predate the change ranking; re-run `{core_command('features', run.root, '--force')}`")
        return torch.sort(s["change"], descending=True, stable=True).indices
    stats = FeatureStats(num_tokens=0, num_examples=0, **{f: s[f] for f in STAT_FIELDS})
    return rank_features(stats, by=by, class_index=class_index)


def load_matching(run: RunFolder, layer: int) -> dict | None:
    path = run.matching_path(layer)
    return read_json(path, MATCHING_FIELDS) if path.is_file() else None


def checked_matching(run: RunFolder, model: str, layer: int, num_features: int, lenient: bool) -> tuple[dict | None, str | None]:
    """The layer's matching (None when the run has none), checked against the ``num_features`` of
    ``model``'s SAE, and why it cannot be used: ``lenient`` (the dashboard) returns that message
    with no matching, so a damaged matching file costs only the match columns; otherwise it raises."""
    try:
        match = load_matching(run, layer)
        for name in ("partner_of_" + model, "similarity_of_" + model, "status_of_" + model):
            if match is not None and len(match[name]) != num_features:
                raise LayerscopeError(
                    f"{run.matching_path(layer)} lists {len(match[name])} {model} features under {name!r}, but the SAE "
                    f"has {num_features}; the file comes from another build: re-run `{core_command('features', run.root, '--force')}`"
                )
        return match, None
    except LayerscopeError as e:
        if not lenient:
            raise
        return None, str(e)


CLASS_PREFERENCE = 0.05  # a feature's best class is named only when its AUROC is at least 0.5 + this


def selectivity_source(aurocs: dict[str, float]) -> tuple[str, float] | None:
    """(class, AUROC) when a feature's selectivity, max |AUROC_c - 0.5| over the classes, comes from
    an AUROC below 0.5 farther from 0.5 than its highest one: the feature fires *less* on that class,
    and the class it fires most for does not explain its score. None otherwise, and always with two
    classes, whose one-vs-rest AUROCs are equally far from 0.5. ``aurocs``: class -> AUROC (NaN:
    undefined, left out)."""
    known = {name: a for name, a in aurocs.items() if a == a}
    if not known:
        return None
    lowest = min(known, key=known.get)
    if 0.5 - known[lowest] > max(known.values()) - 0.5 + 1e-9:
        return lowest, known[lowest]
    return None


def feature_table(run: RunFolder, model: str, layer: int, by: str = "variance", lenient: bool = False) -> pd.DataFrame:
    """One row per feature, in ranking order. ``lenient``: a matching file that cannot be used
    leaves out the match columns, its message in ``df.attrs["matching_problem"]``."""
    s = load_stats(run, model, layer)
    names = run.labels()
    auc = s["selectivity_auroc"].double()  # [d_sae, C] one class vs the rest
    sel = (auc - 0.5).abs().nan_to_num(nan=-1.0).amax(1)
    # the class the feature fires most for: highest AUROC, not the largest |AUROC - 0.5| (with two
    # classes both are equally far from 0.5, so that would name the first class for every feature)
    # None where it prefers none (no AUROC reaches 0.5 + CLASS_PREFERENCE, or all undefined): not a
    # string, which a class could be named
    highest, best_index = auc.nan_to_num(nan=-1.0).max(1)  # [d_sae]: judged on the named class's own AUROC
    best = [names[c] if h - 0.5 >= CLASS_PREFERENCE else None for c, h in zip(best_index.tolist(), highest.tolist())]
    df = pd.DataFrame({"feature": np.arange(len(s["variance"])), "variance": s["variance"].numpy(), "density": s["density"].numpy(), "selectivity": sel.numpy(), "best_class": best})
    if "change" in s:
        df.insert(4, "change", s["change"].numpy())
    for c, name in enumerate(names):
        df[f"mean[{name}]"] = s["mean_per_class"][:, c].numpy()
    if "logit_effect" in s:
        for c, name in enumerate(names):
            df[f"logit_effect[{name}]"] = s["logit_effect"][:, c].numpy()
    match, problem = checked_matching(run, model, layer, len(df), lenient)
    if problem:
        df.attrs["matching_problem"] = problem
    if match:
        other = OTHER_MODEL[model]
        df[f"partner_in_{other}"] = match[f"partner_of_{model}"]
        df["match_similarity"] = [np.nan if (sim := match_similarity(v)) is None else sim for v in match[f"similarity_of_{model}"]]
        df["status"] = match[f"status_of_{model}"]
    order = ranking(run, model, layer, by).numpy()
    return df.iloc[order].reset_index(drop=True)


@lru_cache(maxsize=8)
def _tokenizer(path: str):
    return load_tokenizer(path)


def feature_card(run: RunFolder, model: str, layer: int, feature: int, top: int | None = None, lenient: bool = False) -> dict:
    """Everything the feature browser shows about one feature; ``top``: at most that many top
    examples (None: all that the features step kept, ``features.top_k``). ``lenient``: a matching
    file that cannot be used gives ``match`` None and its message in ``match_problem``."""
    s = load_stats(run, model, layer)
    m = len(s["variance"])
    if not 0 <= feature < m:
        raise LayerscopeError(f"feature {feature} does not exist; this SAE has features 0..{m - 1}")
    names = run.labels()
    tok = _tokenizer(str(run.model_dir("finetuned")))
    test = load_split(run, "test").set_index("id")
    w = s["window_token_ids"].shape[-1] // 2
    examples, shown = [], set()
    kept = s["top_values"].shape[1]
    for j in range(kept if top is None else min(top, kept)):
        value = float(s["top_values"][feature, j])
        if value <= 0:
            break
        ex = int(s["top_example_ids"][feature, j])
        if ex in shown:  # one window per text, at its strongest token: a text's other top tokens would repeat it
            continue
        shown.add(ex)
        ids = s["window_token_ids"][feature, j]
        keep = ids >= 0
        examples.append(
            {
                "example_id": ex,
                "label": names[int(test.loc[ex, "label"])] if ex in test.index else None,
                "tokens": tok.convert_ids_to_tokens(ids[keep].tolist()),
                "activations": s["window_activations"][feature, j][keep].float().tolist(),
                "center": int(keep[:w].sum()),
                "value": value,
            }
        )
    match, match_problem = checked_matching(run, model, layer, m, lenient)
    match_info = None
    if match:
        match_info = {"partner": match[f"partner_of_{model}"][feature], "similarity": match_similarity(match[f"similarity_of_{model}"][feature]), "status": match[f"status_of_{model}"][feature], "other_model": OTHER_MODEL[model]}
    return {
        "model": model,
        "layer": layer,
        "feature": feature,
        "variance": float(s["variance"][feature]),
        "density": float(s["density"][feature]),
        "change": float(s["change"][feature]) if "change" in s else None,
        "top_examples": examples,
        "histogram": {"edges": s["hist_edges"][feature].tolist(), "counts": s["hist_counts"][feature].tolist()},
        "mean_per_class": {n: float(s["mean_per_class"][feature, c]) for c, n in enumerate(names)},
        "selectivity_auroc": {n: float(s["selectivity_auroc"][feature, c]) for c, n in enumerate(names)},
        "match": match_info,
        "match_problem": match_problem,
        "logit_effect": {n: float(s["logit_effect"][feature, c]) for c, n in enumerate(names)} if "logit_effect" in s else None,
    }
