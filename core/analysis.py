"""One sentence through both models and every SAE: what ``analyze`` prints and the dashboard draws.

``load_bundle`` loads a run's tokenizer, both classifiers and all SAEs once; ``sentence_state``
runs the two forward passes (fp32, exact) and keeps every hidden state; the functions
below only do cheap tensor work on that state, so the dashboard can re-slice a sentence
(another layer, another feature) without running the models again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import torch

from core.config import saved_config
from core.data import DataConfig, clean_text
from core.errors import LayerscopeError, StatsUnreadable
from core.models import encode, kept_span, load_classifier, load_tokenizer, quiet_transformers, run_labels
from core.runfolder import MODEL_NAMES, MODELS, OTHER_MODEL, RunFolder, core_command, match_similarity
from core.sae import topk_rows
from core.saes import load_sae

MAX_TEXT_CHARS = 50_000  # twice the longest text of the shipped datasets (a BBC article of 25,484); the models read max_length tokens of it
# Dataset-level rankings come from the features step ("change": mean |z_ft - z_pre| over the test
# tokens, the SAE applied to both models). Two rank the features of each SAE on the sentence
# analysed instead: "sentence" by their variance over its tokens (the paper's measure, on one
# text: the features that vary most along it), "sentence-change" by how much fine-tuning moved
# them on it: sum over its tokens of |z_ft - z_pre| (the explorer's difference row, summed).
DATASET_RANKINGS = ("variance", "selectivity", "density", "change")
SENTENCE_RANKING, SENTENCE_CHANGE_RANKING = "sentence", "sentence-change"
RANKINGS = (*DATASET_RANKINGS, SENTENCE_RANKING, SENTENCE_CHANGE_RANKING)
SENTENCE_LABEL = "variance over this sentence"
SENTENCE_CHANGE_LABEL = "|fine-tuned − pre-trained| over this sentence"
# Compared sentences are ranked on their tokens together, so that their charts list the same features.
JOINT_LABELS = {SENTENCE_RANKING: "variance over the compared sentences", SENTENCE_CHANGE_RANKING: "|fine-tuned − pre-trained| over the compared sentences"}


@dataclass
class Bundle:
    """Everything loaded once per run."""

    run: RunFolder
    tokenizer: object
    models: dict  # "pretrained" / "finetuned" -> classifier (eval, fp32)
    saes: dict  # (model, layer) -> SparseAutoencoder
    labels: list[str]
    config: dict  # the run's resolved config
    rankings: dict = field(default_factory=dict)  # (model, layer, by) -> LongTensor, or None when unavailable; filled lazily
    ranking_problems: dict = field(default_factory=dict)  # (model, layer, by) -> why that ranking is unavailable
    stacks: list = field(default_factory=list, repr=False)  # SAE weights stacked for one batched encode (``_stacks``), filled lazily
    stacks_of: list = field(default_factory=list, repr=False)  # the (key, id(sae)) pairs ``stacks`` was built from
    sae_problems: dict = field(default_factory=dict)  # (model, layer) -> why that SAE was left out (``load_bundle(lenient=True)``)
    labels_problem: str | None = None  # why the run's class names could not be used (lenient: the model's own names instead)

    @property
    def sae_layers(self) -> list[int]:
        return sorted({layer for _, layer in self.saes})


@dataclass
class SentenceState:
    text: str  # what the models saw (after the run's cleaning, if asked)
    token_ids: list[int]
    tokens: list[str]
    special: list[bool]
    hidden: dict  # model -> [num_layers + 1, T, d] float32
    probabilities: list[float]
    truncation: dict | None = None  # what the models did not see of a long text (see ``truncation_info``)
    cleaning: str = "off"  # the run's cleaning of the text: "off", "unchanged", "cleaned", or "emptied" (nothing left: read as typed)
    unknown_tokens: int = 0  # tokens the vocabulary does not cover ([UNK])


def _layers(n: int) -> str:
    return f"{n} layer{'s' * (n != 1)}"


def load_bundle(run: RunFolder, lenient: bool = False) -> Bundle:
    """Tokenizer, both classifiers and every SAE of ``run``. ``lenient`` (the dashboard): an SAE
    that cannot be loaded, or a class-name file that does not fit the model, is left out with its
    message in ``sae_problems`` / ``labels_problem``, so one damaged file costs only what reads it;
    otherwise (``analyze``) it raises."""
    run.require("finetune", "the analyze command")
    quiet_transformers()
    m = run.manifest()
    saved = saved_config(run, m)  # before the models load: a damaged saved config costs no wait
    tok = load_tokenizer(str(run.model_dir("finetuned")))
    models = {name: load_classifier(str(run.model_dir(name))).eval() for name in MODELS}
    hidden_size = models["finetuned"].config.hidden_size
    positions = getattr(models["finetuned"].config, "max_position_embeddings", None)
    if positions and saved.model.max_length > positions:  # the build checks this: only a hand edit gets here
        raise LayerscopeError(
            f"{run.manifest_path} saves model.max_length={saved.model.max_length}, more than the {positions} positions the models read; "
            f"its saved config was edited since the build: put back the value it was built with (at most {positions})"
        )
    labels_problem = None
    try:
        labels = run_labels(run, models["finetuned"].config.num_labels)
    except LayerscopeError as e:
        if not lenient:
            raise
        config = models["finetuned"].config
        labels, labels_problem = [str(config.id2label.get(i, f"class {i}")) for i in range(config.num_labels)], str(e)
    depths = {name: model.config.num_hidden_layers for name, model in models.items()}
    redo = f"restore it, or rebuild the run with `{core_command('build', run.root, '--force')}`"
    if len(set(depths.values())) > 1:  # one config.json edited since the build: hidden states would not pair up
        raise LayerscopeError(
            " and ".join(f"{run.model_config_path(m)} gives the {m} model {_layers(n)}" for m, n in depths.items())
            + f"; one config.json was edited since the build: {redo}"
        )
    saes, problems = {}, {}
    for model, layer, _ in run.sae_dirs():
        try:
            if layer > depths[model]:  # the weights still match (the SAE checks those), the config does not
                raise LayerscopeError(
                    f"{run.model_config_path(model)} gives the {model} model {_layers(depths[model])}, but its SAE at layer {layer} "
                    f"was trained on hidden state {layer}; the config.json was edited since the build: {redo}"
                )
            saes[(model, layer)] = load_sae(run, model, layer, hidden_size).eval()
        except (LayerscopeError, OSError) as e:
            if not lenient:
                raise
            problems[(model, layer)] = str(e) if isinstance(e, LayerscopeError) else f"cannot read {e.filename or run.sae_dir(model, layer)}: {e.strerror or e}"
    return Bundle(run=run, tokenizer=tok, models=models, saes=saes, labels=labels, config=saved.to_dict(), sae_problems=problems, labels_problem=labels_problem)


@cache
def _forward_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=len(MODELS), thread_name_prefix="layerscope-forward")


def _forward(model, input_ids: torch.Tensor):
    with torch.no_grad():  # grad mode is per thread: set it in the worker
        return model(input_ids=input_ids, output_hidden_states=True)


def _forward_on_one_thread(model, input_ids: torch.Tensor):
    """``_forward`` in a pool thread, on one torch thread (the count is per thread; this one keeps it)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return _forward(model, input_ids)


def _forwards(bundle: Bundle, input_ids: torch.Tensor) -> dict:
    """{model name: output} of both models on one sentence.

    With one torch thread per model or fewer (the dashboard on 2 cores has one in all), the
    forwards run side by side in two pool threads, one torch thread each: ~20 ms instead of ~38 ms
    for 64 tokens. With more, one after the other in this thread: more torch threads in the pool
    threads would start an OpenMP team in each, and once its teams hold more threads than the
    machine has cores, libgomp stops spin-waiting in every team of the process, for good. Two
    forwards side by side on two threads each (the CLI on 2 cores) made every later forward of the
    process 60% slower (one sentence's two forwards 21 -> 34 ms) and gained nothing.
    """
    names = list(bundle.models)
    threads = torch.get_num_threads()
    if threads > len(names):
        return {name: _forward(bundle.models[name], input_ids) for name in names}
    outputs = dict(zip(names, _forward_pool().map(_forward_on_one_thread, [bundle.models[n] for n in names], [input_ids] * len(names))))
    if threads != 1:
        torch.set_num_threads(threads)  # set_num_threads also sets the count later threads start with: put it back
    return outputs


def sentence_state(bundle: Bundle, text: str, clean: bool = True) -> SentenceState:
    """Tokenise (with the run's cleaning and truncation) and run both models once.

    The two forward passes run side by side in two threads when each has one torch thread
    (``_forwards``; torch releases the GIL inside its kernels).
    """
    if not text or not text.strip():
        raise LayerscopeError("the sentence is empty; type some text to analyse")
    if not any(ch.isprintable() and not ch.isspace() for ch in text):  # e.g. zero-width spaces: the models would read [CLS] [SEP] alone
        raise LayerscopeError("the sentence has no visible characters (only invisible ones, such as zero-width spaces); type some text to analyse")
    if len(text) > MAX_TEXT_CHARS:
        raise LayerscopeError(f"the text has {len(text):,} characters; analyse at most {MAX_TEXT_CHARS:,} at a time")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8 on the command line (Python's surrogateescape)
        raise LayerscopeError(f"the text is not valid UTF-8 (character {e.start + 1} of {len(text)} is a lone surrogate, e.g. from non-UTF-8 bytes); pass UTF-8 text") from None
    cleaning = "off"
    if clean:  # as the data step cleaned the training texts
        cleaned = clean_text(text, DataConfig(**{k: v for k, v in bundle.config["data"].items() if k in DataConfig.__dataclass_fields__}))
        cleaning = "unchanged" if cleaned == text else "cleaned" if cleaned else "emptied"
        text = cleaned or text
    mc = bundle.config["model"]
    ids = encode(bundle.tokenizer, [text], mc["max_length"], mc["truncation"])[0]
    input_ids = torch.tensor([ids])
    outputs = _forwards(bundle, input_ids)
    hidden = {name: torch.stack(out.hidden_states)[:, 0].float() for name, out in outputs.items()}  # [L+1, T, d]
    probs = torch.softmax(outputs["finetuned"].logits[0].float(), -1).tolist()
    special_ids = set(bundle.tokenizer.all_special_ids)
    return SentenceState(
        text=text,
        token_ids=ids,
        tokens=bundle.tokenizer.convert_ids_to_tokens(ids),
        special=[i in special_ids for i in ids],
        hidden=hidden,
        probabilities=probs,
        truncation=truncation_info(bundle.tokenizer, text, len(ids), mc["max_length"], mc["truncation"]),
        cleaning=cleaning,
        unknown_tokens=sum(i == bundle.tokenizer.unk_token_id for i in ids),
    )


def truncation_info(tokenizer, text: str, num_tokens: int, max_length: int, truncation: str) -> dict | None:
    """None when the models saw all of ``text``; else ``text_tokens`` (its length in tokens,
    special ones not counted), ``kept_head`` / ``kept_tail`` (how many of them the models read
    from its start and its end, as in training) and ``cut_after`` (index, in the token list the
    models saw, of the last token before the left-out part)."""
    if num_tokens < max_length:  # shorter than the limit: nothing can have been cut
        return None
    n = len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
    # special tokens the tokenizer adds around a text, and how many of them lead ([CLS]): from a
    # one-word text, since [UNK] counts as special too and a long text may hold some
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    lead = next((i for i in range(len(framed)) if framed[i : i + len(bare)] == bare), 0)
    head, tail = kept_span(n, max_length, truncation, specials=len(framed) - len(bare))
    if tail == 0 and head == n:
        return None
    return {"text_tokens": n, "kept_head": head, "kept_tail": tail, "cut_after": lead + head - 1}


def layer_cosine(state: SentenceState) -> list[list[float]]:
    """[L+1][T] cosine between the pre-trained and fine-tuned hidden state of every token.

    In fp32, as the hidden states are (error ~1e-7, far below the 3-4 decimals shown): float64
    copies of both [L+1, T, d] stacks cost 1-2 ms per Enter at 64 tokens, mostly page faults on
    the fresh memory, for digits nobody reads."""
    return torch.nn.functional.cosine_similarity(state.hidden["pretrained"], state.hidden["finetuned"], dim=-1).tolist()


def latents(bundle: Bundle, state: SentenceState, sae_model: str, layer: int, on_model: str | None = None) -> torch.Tensor:
    """[T, d_sae] activations of the SAE trained on ``sae_model`` at ``layer``, applied to ``on_model``'s hidden states."""
    sae = bundle.saes.get((sae_model, layer))
    if sae is None:
        raise LayerscopeError(f"this run has no SAE for {sae_model} layer {layer}; layers with {sae_model} SAEs: {sorted(l for m, l in bundle.saes if m == sae_model)}")
    with torch.no_grad():
        return sae.encode(state.hidden[on_model or sae_model][layer])


def feature_order(bundle: Bundle, model: str, layer: int, by: str = "variance") -> torch.Tensor | None:
    """Dataset-level ranking from the features step, or None when that step has not run or its
    statistics lack this ranking (and for the per-sentence rankings, which have no dataset-level
    order). A statistics file that is there but damaged raises ``StatsUnreadable``: a ranking
    asked for is not swapped for another without a word."""
    if by in (SENTENCE_RANKING, SENTENCE_CHANGE_RANKING):
        return None
    key = (model, layer, by)
    if key not in bundle.rankings:
        from core.features_step import ranking

        try:
            bundle.rankings[key] = ranking(bundle.run, model, layer, by)
        except StatsUnreadable:
            raise
        except LayerscopeError as e:  # the step has not finished, a file is missing, or it predates this ranking
            bundle.rankings[key] = None
            bundle.ranking_problems[key] = str(e)
    return bundle.rankings[key]


def _change(bundle: Bundle, state: SentenceState, model: str, layer: int) -> torch.Tensor:
    """[T, d_sae] fine-tuned - pre-trained activations of one SAE, applied to both models' hidden states."""
    z, z_other = latents(bundle, state, model, layer), latents(bundle, state, model, layer, OTHER_MODEL[model])
    return z_other - z if model == "pretrained" else z - z_other


def sentence_order(bundle: Bundle, states: list[SentenceState], model: str, layer: int, by: str) -> torch.Tensor:
    """The features of the (``model``, ``layer``) SAE ranked over the tokens of every sentence in
    ``states`` together, by a per-sentence ranking: "sentence", their variance over all those
    tokens; "sentence-change", |fine-tuned - pre-trained| summed over them. One sentence: its own
    ranking. Compared sentences ranked this way list the same features, on one scale."""
    if by == SENTENCE_CHANGE_RANKING:
        return torch.argsort(sum(_change(bundle, s, model, layer).abs().sum(0) for s in states), descending=True, stable=True)
    if by != SENTENCE_RANKING:
        raise LayerscopeError(f"{by!r} is not a per-sentence ranking; use {SENTENCE_RANKING} or {SENTENCE_CHANGE_RANKING}")
    z = torch.cat([latents(bundle, s, model, layer) for s in states])  # [T_1 + T_2 + ..., d_sae]
    return torch.argsort(z.var(0), descending=True, stable=True)


def top_features(bundle: Bundle, state: SentenceState, model: str, layer: int, top: int = 5, by: str = "variance", order: torch.Tensor | None = None) -> list[dict]:
    """The ``top`` features of the SAE of (``model``, ``layer``) by ``by`` (see ``RANKINGS``), each
    with its activation per token on that SAE's own model; ranked by sentence-change, also its
    ``difference`` per token (fine-tuned - pre-trained, the SAE applied to both models).
    ``order``: a ranking made already (``sentence_order`` over compared sentences)."""
    z = latents(bundle, state, model, layer)  # [T, d_sae]
    if by == SENTENCE_CHANGE_RANKING:  # the same dictionary on both models' hidden states: |ft - pre| summed over tokens
        diff = _change(bundle, state, model, layer)  # [T, d_sae] fine-tuned - pre-trained
        if order is None:
            order = torch.argsort(diff.abs().sum(0), descending=True, stable=True)
        return [{**entry, "difference": diff[:, entry["feature"]].tolist()} for entry in _ranked(z, order, top)]
    if order is None:
        order = feature_order(bundle, model, layer, by)
    if order is None:  # "sentence", or no dataset statistics yet: rank by variance over this sentence
        order = torch.argsort(z.var(0), descending=True, stable=True)
    return _ranked(z, order, top)


def _ranked(z: torch.Tensor, order: torch.Tensor, top: int) -> list[dict]:
    return [{"feature": int(f), "activations": z[:, f].tolist()} for f in order[:top]]


@dataclass
class _Stack:
    """SAEs of one shape and architecture, weights stacked along a leading axis of size S."""

    keys: list  # [(model, layer)] in stacking order
    architecture: str
    k: int
    W_enc: torch.Tensor  # [S, d_in, d_sae]
    b_enc: torch.Tensor  # [S, 1, d_sae]
    b_dec: torch.Tensor  # [S, 1, d_in] (subtracted before encoding: topk only)
    scale: torch.Tensor  # [S, 1, 1] normalization_scale


def _stacks(bundle: Bundle) -> list[_Stack]:
    """Group the bundle's SAEs by (architecture, k, d_in, d_sae) and stack their encoder weights (cached)."""
    ident = [(key, id(sae)) for key, sae in sorted(bundle.saes.items())]
    if bundle.stacks_of == ident:  # the same SAE objects as last time (a test may swap one in)
        return bundle.stacks
    groups: dict = {}
    for key, sae in sorted(bundle.saes.items()):
        c = sae.cfg
        groups.setdefault((c.architecture, c.k if c.architecture == "topk" else 0, c.d_in, c.d_sae, sae.W_enc.dtype), []).append(key)
    stacks = []
    with torch.no_grad():
        for (arch, k, _, _, dtype), keys in groups.items():
            saes = [bundle.saes[key] for key in keys]
            stacks.append(_Stack(
                keys=keys,
                architecture=arch,
                k=k,
                W_enc=torch.stack([s.W_enc for s in saes]).contiguous(),
                b_enc=torch.stack([s.b_enc for s in saes])[:, None, :],
                b_dec=torch.stack([s.b_dec for s in saes])[:, None, :],
                scale=torch.tensor([s.cfg.normalization_scale for s in saes], dtype=dtype)[:, None, None],
            ))
    bundle.stacks, bundle.stacks_of = stacks, ident
    return stacks


@torch.no_grad()
def _encode_stack(st: _Stack, state: SentenceState) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Every SAE of ``st`` on its own model's hidden states, in one batched matmul: the operations of
    ``SparseAutoencoder.encode`` applied SAE by SAE. Returns (dense latents ``[S, T, d_sae]``, None, None)
    for ReLU SAEs and (None, values, indices) ``[S, T, k]`` for TopK ones (dense = 0 elsewhere)."""
    x = torch.stack([state.hidden[m][layer] for m, layer in st.keys]).to(st.W_enc.dtype) / st.scale  # [S, T, d]
    if st.architecture == "topk":
        x = x - st.b_dec
    pre = torch.baddbmm(st.b_enc, x, st.W_enc)  # [S, T, m] = x @ W_enc + b_enc
    S, T, m = pre.shape
    if st.architecture != "topk":
        return torch.relu(pre), None, None
    values, indices = topk_rows(pre.view(S * T, m), st.k)
    return None, values.relu().view(S, T, -1), indices.view(S, T, -1)


def _variance_over_tokens(values: torch.Tensor, indices: torch.Tensor, m: int) -> torch.Tensor:
    """Unbiased variance over tokens of the dense TopK latents ``[S, T, m]`` given by (values, indices)
    ``[S, T, k]``: ``z.var(1)`` computed over the k active entries per token only (two-pass, float64)."""
    S, T, _ = values.shape
    v = values.reshape(S, -1).double()  # [S, T*k]
    flat = indices.reshape(S, -1)
    mean = torch.zeros(S, m, dtype=torch.float64).scatter_add_(1, flat, v) / T  # [S, m]
    dev = v - mean.gather(1, flat)  # active entries minus their column mean
    active = torch.zeros(S, m, dtype=torch.float64).scatter_add_(1, flat, torch.ones_like(v))
    ss = torch.zeros(S, m, dtype=torch.float64).scatter_add_(1, flat, dev * dev) + (T - active) * mean * mean  # each zero adds mean^2
    return (ss / (T - 1)).float() if T > 1 else torch.full((S, m), float("nan"))


def _all_top_features(bundle: Bundle, state: SentenceState, top: int, by: str) -> dict:
    """{(model, layer): [{"feature", "activations"}]} for every SAE: what ``top_features`` returns SAE by SAE."""
    out = {}
    for st in _stacks(bundle):
        z, values, indices = _encode_stack(st, state)
        orders = [feature_order(bundle, m, layer, by) for m, layer in st.keys]
        if any(o is None for o in orders):  # "sentence", or no dataset statistics yet: variance over this sentence
            var = z.var(1) if z is not None else _variance_over_tokens(values, indices, st.W_enc.shape[2])
            by_var = torch.argsort(var, dim=1, descending=True, stable=True)
            orders = [o if o is not None else by_var[i] for i, o in enumerate(orders)]
        feats = torch.stack([o[:top] for o in orders])  # [S, top]
        if z is not None:
            acts = z.gather(2, feats[:, None, :].expand(-1, z.shape[1], -1))  # [S, T, top]
        else:  # a latent appears at most once among a token's k indices: the sum picks its value or 0
            hit = indices.unsqueeze(3) == feats[:, None, None, :]  # [S, T, k, top]
            acts = (values.unsqueeze(3) * hit).sum(2)  # [S, T, top]
        acts = acts.transpose(1, 2).tolist()  # [S][top][T]
        for i, key in enumerate(st.keys):
            out[key] = [{"feature": f, "activations": a} for f, a in zip(feats[i].tolist(), acts[i])]
    return out


def analyze_text(
    bundle: Bundle,
    text: str,
    top: int = 5,
    rank_by: str = "variance",
    clean: bool = True,
    state: SentenceState | None = None,
    saes: list[tuple[str, int]] | None = None,
    compared: list[SentenceState] | None = None,
) -> dict:
    """The full per-sentence analysis (``python -m core analyze --json``).

    ``saes`` limits the top features to those (model, layer) SAEs (the dashboard shows one at a
    time); by default every SAE of the run is encoded, in one batched matmul per shape.
    ``compared``: the states of every sentence compared with this one (this one included); a
    per-sentence ranking then ranks over all their tokens together (``sentence_order``), so each
    sentence's analysis lists the same features.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise LayerscopeError(f"top={top!r}: ask for at least 1 feature per SAE (--top N, default 5)")
    if rank_by not in RANKINGS:
        raise LayerscopeError(f"unknown ranking {rank_by!r}; use one of {', '.join(RANKINGS)} (--rank-by)")
    state = state or sentence_state(bundle, text, clean)
    keys = list(bundle.saes) if saes is None else [(m, int(l)) for m, l in saes]
    joint = compared is not None and len(compared) > 1 and rank_by in JOINT_LABELS
    if joint:
        features = {k: top_features(bundle, state, *k, top, rank_by, order=sentence_order(bundle, compared, *k, rank_by)) for k in keys}
    elif saes is None and rank_by != SENTENCE_CHANGE_RANKING:  # every SAE in one batched encode per shape
        features = _all_top_features(bundle, state, top, rank_by)
    else:
        features = {k: top_features(bundle, state, k[0], k[1], top, rank_by) for k in keys}
    ranked = {key: feature_order(bundle, *key, rank_by) is not None for key in keys}
    step_done = not all(ranked.values()) and bundle.run.is_done("features")  # then a missing ranking is one SAE's problem, named in its label
    labels = {key: ranking_label(rank_by, r, bundle.ranking_problems.get((*key, rank_by)) if step_done else None) for key, r in ranked.items()}
    if joint:
        labels = {key: JOINT_LABELS[rank_by] for key in keys}
    uniform = len(set(labels.values())) <= 1
    label = (next(iter(labels.values())) if labels else JOINT_LABELS[rank_by] if joint else ranking_label(rank_by, True)) if uniform else f"{rank_by}, or variance over this sentence for an SAE without statistics (see each SAE's ranking)"
    return {
        "text": state.text,
        "tokens": state.tokens,
        "special": state.special,
        "cosine": layer_cosine(state),
        "prediction": {
            "label": bundle.labels[max(range(len(state.probabilities)), key=state.probabilities.__getitem__)],
            "probabilities": dict(zip(bundle.labels, state.probabilities)),
        },
        "truncation": state.truncation,
        "cleaning": state.cleaning,
        "unknown_tokens": state.unknown_tokens,
        "ranking": label,
        "saes": [
            {"model": m, "layer": l, "ranking": labels[(m, l)], "features": features[(m, l)]}
            for m, l in sorted(keys, key=lambda k: (MODELS.index(k[0]), k[1]))
        ],
    }


def analyze_texts(bundle: Bundle, texts: list[str], top: int = 5, rank_by: str = "variance", clean: bool = True) -> list[dict]:
    """Several sentences compared (``analyze --text A --text B``), as in the explorer's compare
    mode: each is run through both models once, and a per-sentence ranking ranks over all their
    tokens together, so every analysis lists the same features in the same order."""
    states = []
    for i, text in enumerate(texts, 1):
        try:
            states.append(sentence_state(bundle, text, clean))
        except LayerscopeError as e:  # which of the texts
            raise LayerscopeError(f"text {i} of {len(texts)}: {e}") from None
    return [analyze_text(bundle, t, top=top, rank_by=rank_by, clean=clean, state=s, compared=states) for t, s in zip(texts, states)]


def ranking_label(rank_by: str, ranked: bool, problem: str | None = None) -> str:
    """What the top features were ranked by, as ``analyze`` reports it: the dataset-level ranking
    asked for, or the variance over this sentence (asked for, or the fallback before the features
    step; ``problem``: why this SAE's ranking is missing although the features step has finished,
    e.g. its statistics file is gone)."""
    if rank_by == SENTENCE_RANKING:
        return SENTENCE_LABEL
    if rank_by == SENTENCE_CHANGE_RANKING:
        return SENTENCE_CHANGE_LABEL
    if ranked:
        return rank_by
    if problem:
        return SENTENCE_LABEL + f" (no dataset-level {rank_by} for this SAE: {problem})"
    return SENTENCE_LABEL + ("" if rank_by == "variance" else f" (this run has no dataset-level {rank_by} yet: run the features step, or re-run it with --force)")


def sentence_features(bundle: Bundle, state: SentenceState, layer: int, feature: int, sae_model: str = "pretrained") -> dict:
    """One SAE's feature on both models' hidden states: the same dictionary, so the difference means something."""
    sae = bundle.saes.get((sae_model, layer))
    if sae is None or not 0 <= feature < sae.cfg.d_sae:
        raise LayerscopeError(f"no feature {feature} in the {sae_model} SAE of layer {layer}")
    pre = latents(bundle, state, sae_model, layer, "pretrained")[:, feature]
    ft = latents(bundle, state, sae_model, layer, "finetuned")[:, feature]
    return {"tokens": state.tokens, "pretrained": pre.tolist(), "finetuned": ft.tolist(), "difference": (ft - pre).tolist()}


def matched_features(bundle: Bundle, state: SentenceState, layer: int, feature: int, sae_model: str = "pretrained") -> dict:
    """A feature of one model's SAE on that model next to its matched partner in the other model's
    SAE on the other model (``partner < 0``: none, shown as zeros). ``feature_pretrained`` and
    ``feature_finetuned`` name the pair; ``similarity`` and ``status`` are the chosen feature's."""
    from core.features_step import checked_matching

    z = latents(bundle, state, sae_model, layer)  # [tokens, d_sae] on its own model (an SAE the run lacks: its own message)
    match, _ = checked_matching(bundle.run, sae_model, layer, z.shape[1], lenient=False)  # a file from another build: named
    if match is None:
        if bundle.run.is_done("features"):  # the step ran: its file of this layer is gone
            raise LayerscopeError(f"no feature matching for layer {layer} ({bundle.run.matching_path(layer)} is missing); re-run `{core_command('features', bundle.run.root, '--force')}`")
        raise LayerscopeError(f"no feature matching in this run yet; run `{core_command('build', bundle.run.root, '--until', 'features')}` first")
    other = OTHER_MODEL[sae_model]
    n = len(match[f"partner_of_{sae_model}"])
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < n:
        raise LayerscopeError(f"no feature {feature} in the {MODEL_NAMES[sae_model]} SAE of layer {layer}: its features are 0..{n - 1}")
    partner = int(match[f"partner_of_{sae_model}"][feature])
    mine = z[:, feature]  # [tokens]
    theirs = torch.zeros_like(mine)
    if partner >= 0:
        z_other = latents(bundle, state, other, layer)  # [tokens, d_sae of the other SAE]
        if partner >= z_other.shape[1]:
            raise LayerscopeError(
                f"{bundle.run.matching_path(layer)} pairs feature {feature} with feature {partner} of the {MODEL_NAMES[other]} SAE, "
                f"which has {z_other.shape[1]}; the file comes from another build: re-run `{core_command('features', bundle.run.root, '--force')}`"
            )
        theirs = z_other[:, partner]
    ids = {sae_model: feature, other: partner}
    pre, ft = (mine, theirs) if sae_model == "pretrained" else (theirs, mine)
    return {
        "tokens": state.tokens,
        "sae_model": sae_model,
        "feature_pretrained": ids["pretrained"],
        "feature_finetuned": ids["finetuned"],
        "similarity": match_similarity(match[f"similarity_of_{sae_model}"][feature]),
        "status": match[f"status_of_{sae_model}"][feature],
        "pretrained": pre.tolist(),
        "finetuned": ft.tolist(),
        "difference": (ft - pre).tolist(),
    }


def truncation_note(cut: dict) -> str:
    """One sentence on what a long text lost, for the CLI and the dashboard."""
    left_out = cut["text_tokens"] - cut["kept_head"] - cut["kept_tail"]
    if cut["kept_tail"]:
        read = f"its first {cut['kept_head']} and its last {cut['kept_tail']} ({left_out} in between left out)"
    else:
        read = f"its first {cut['kept_head']} (the last {left_out} left out)"
    return f"the text has {cut['text_tokens']} tokens; as in training, the models read {read}"


def _unknown_and_words(result: dict) -> tuple[int, int]:
    """([UNK] tokens, tokens that are not [CLS]/[SEP]/padding) of an analysed text."""
    unknown = result.get("unknown_tokens", 0)
    return unknown, sum(not s for s in result["special"]) + unknown  # [UNK] is one of the tokenizer's special tokens


def reads_no_word(result: dict) -> bool:
    """Every token of the text is [UNK]: the models read nothing of it."""
    unknown, words = _unknown_and_words(result)
    return bool(words) and unknown == words


def reading_notes(result: dict) -> list[str]:
    """What the models could not read of a text: all of it lost to the run's cleaning, or many
    tokens outside the vocabulary (emoji, scripts the model was not trained on)."""
    notes = []
    if result.get("cleaning") == "emptied":
        notes.append("the run's cleaning (the one its training texts went through) leaves nothing of this text, so the models read it as typed, unlike any training text")
    unknown, words = _unknown_and_words(result)
    if unknown and unknown * 3 >= words:
        if unknown == words:
            share = "its only token is" if words == 1 else "both its tokens are" if words == 2 else f"all {words} of its tokens are"
        else:
            share = f"{unknown} of its {words} tokens " + ("is" if unknown == 1 else "are")
        notes.append(f"{share} unknown to the model's vocabulary ([UNK]): the models read nothing of what was there")
    return notes


def format_analysis(result: dict) -> str:
    lines = [f"text: {result['text']}"]
    if result.get("truncation"):
        lines.append(truncation_note(result["truncation"]))
    lines += [f"note: {note}" for note in reading_notes(result)]
    lines += ["prediction: " + ", ".join(f"{k} {v:.3f}" for k, v in result["prediction"]["probabilities"].items())]
    lines.append("cosine(pre, ft) per layer, mean over tokens: " + " ".join(f"{sum(c) / len(c):.3f}" for c in result["cosine"]))
    width = max(len(t) for t in result["tokens"])
    for sae in result["saes"]:
        # ranked by sentence-change, the table shows what the ranking measured: fine-tuned - pre-trained
        shown = "difference" if sae["features"] and "difference" in sae["features"][0] else "activations"
        values = "; values: fine-tuned − pre-trained activation" if shown == "difference" else ""
        lines.append(f"\nSAE {sae['model']} layer {sae['layer']} (top features by {sae.get('ranking', result['ranking'])}{values})")
        lines.append(" " * (width + 2) + " ".join(f"{'f' + str(f['feature']):>7}" for f in sae["features"]))
        for t, tok in enumerate(result["tokens"]):
            lines.append(f"{tok:<{width}}  " + " ".join(f"{f[shown][t]:7.3f}" for f in sae["features"]))
    return "\n".join(lines)
