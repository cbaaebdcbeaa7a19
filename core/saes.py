"""Step ``saes``: one sparse autoencoder per (model, layer), trained on streamed token activations.

For every model in {pretrained, finetuned} and every chosen hidden-state index, an SAE is
trained on the train-split activation shards (streamed, shuffled; the trainer in
``core.sae_training`` only ever sees tensors) and evaluated on the held-out test-split
tokens: MSE, FVU, L0, dead and dense fractions (``core.sae_metrics``), and downstream
fidelity: the fine-tuned classifier's accuracy and mean KL(original || spliced) of its class
distribution when that layer's hidden state is replaced by the SAE reconstruction. For a
pre-trained SAE this reads the *fine-tuned* model's hidden state (the pre-trained model has no
trained head to judge by), so its fidelity includes drift; its FVU on the fine-tuned model's
activations at the same layer (``fvu_on_finetuned``) measures that drift alone.

Each SAE lands in ``saes/<model>/layer_<i>/`` (cfg.json + sae_weights.safetensors +
metrics.json). The step is resumable SAE by SAE: a folder whose metrics.json carries
the same settings hash is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass, field

import torch

from core.activations import ActivationStore
from core.data import load_split
from core.errors import LayerscopeError, OptionCheck
from core.models import ModelConfig, encode, hidden_state_module, load_classifier, load_tokenizer, model_fingerprint, pad_batch, predict_proba, quiet_transformers
from core.progress import progress_bar
from core.rss import available_memory_bytes
from core.files import atomic_path, write_json
from core.runfolder import MODELS, SAE_CFG_FILE, SAE_METRICS_FIELDS, SAE_METRICS_FILE, RunFolder, core_command, read_json
from core.sae import RETRAIN_HINT, SAEConfig, SparseAutoencoder, check_compatible, retrain_hint
from core.sae_metrics import evaluate_sae
from core.sae_training import DyingLatents, SAETrainingConfig, train_sae
from core.threads import run_side_by_side


@dataclass
class SAEsConfig:
    layers: list[int] = field(default_factory=list)  # hidden-state indices; [] = every block 1..L when L <= 8, else 3, L // 2 and L (the paper's 3, 6, 12 for 12 blocks)
    architecture: str = "topk"  # "topk" (default) or "paper" (ReLU + L1, the paper's recipe)
    expansion_factor: int = 4  # d_sae = expansion_factor * d_model (paper: 1024 latents for 768 wide)
    d_sae: int = 0  # explicit dictionary size; 0 = use expansion_factor
    k: int = 32  # TopK: active latents per token
    l1_coefficient: float = 1e-3  # paper: lambda of the L1 penalty
    input: str = "tokens"  # "tokens" (default) or "mean_pooled" (what the paper's code trained on)
    epochs: float = 3.0  # passes over the train-split tokens (paper: 10)
    init_tokens: int = 20000  # tokens used to fix the input scale and initialise the decoder bias
    splice_examples: int | None = None  # test texts for spliced accuracy / KL: None = every test text, N = a seeded sample of N, 0 = skip
    workers: int = field(default=2, metadata={"execution_only": True})  # SAEs trained and evaluated side by side, each on its share of torch's threads (1 = one after another; same SAEs either way)
    lr_backoff: float = 4.0  # TopK: when training.dead_backoff trips, restart that SAE at lr / lr_backoff (0 = never restart)
    # optimiser settings (lr, batch size, AuxK, bf16...); TopK defaults tuned on MiniLM/IMDb (README, "SAE quality")
    training: SAETrainingConfig = field(default_factory=lambda: SAETrainingConfig(lr=4e-3, batch_size=2048, dead_steps_threshold=25, dead_backoff=0.1))

    def validate(self) -> None:
        check = OptionCheck("saes", self)
        check.indices("layers")
        check.choice("architecture", "topk", "paper")
        check.choice("input", "tokens", "mean_pooled")
        check.at_least(1, "expansion_factor", "k", "workers")
        check.at_least(0, "d_sae", "l1_coefficient")
        check.positive("epochs")
        check.at_least(2, "init_tokens")
        if self.d_sae and self.k > self.d_sae:
            check.fail("k", f"at most saes.d_sae ({self.d_sae})")
        if self.splice_examples is not None and not (isinstance(self.splice_examples, int) and self.splice_examples >= 0):
            check.fail("splice_examples", "a number of test texts (0 skips the splice check) or none for all of them")
        if self.lr_backoff != 0:
            check.at_least(1, "lr_backoff")  # 0 = never restart; below 1 would raise the rate
        self.training.validate()
        if self.training.epochs != 1:  # the step streams its shards; its passes are saes.epochs
            OptionCheck("saes.training", self.training).fail("epochs", "1 in the saes step, which streams its shards once per pass; set the passes over the tokens with saes.epochs instead")


def check_memory(cfg: SAEsConfig, d_in: int) -> None:
    """Refuse a dictionary whose training cannot fit in the memory this machine has free, before
    any work, instead of a failed allocation inside torch. The figure is a lower bound (the two
    weight matrices with their gradients and Adam's two moments, 4 x 2 x d_in x d_sae floats, plus
    one batch of pre-activations), so a setting that would fit is never refused."""
    d_sae = cfg.d_sae or cfg.expansion_factor * d_in
    need = 4 * (4 * 2 * d_in * d_sae + cfg.training.batch_size * d_sae)
    free = available_memory_bytes()
    if free is not None and need > free:
        size = "saes.d_sae" if cfg.d_sae else f"saes.expansion_factor={cfg.expansion_factor}"
        raise LayerscopeError(
            f"an SAE of {d_sae:,} latents on {d_in}-wide hidden states needs at least {need / 2**30:,.1f} GiB to train "
            f"(weights, gradients, Adam's moments and one batch of {cfg.training.batch_size:,}), more than the "
            f"{free / 2**30:,.1f} GiB free here; lower {size} or saes.training.batch_size"
        )


def default_layers(num_blocks: int) -> list[int]:
    """Every block for small models; the paper's early/middle/last layers for deeper ones."""
    if num_blocks <= 8:
        return list(range(1, num_blocks + 1))
    return sorted({3, num_blocks // 2, num_blocks})


def resolve_layers(cfg: SAEsConfig, num_blocks: int) -> list[int]:
    layers = cfg.layers or default_layers(num_blocks)
    bad = [l for l in layers if not 0 <= l <= num_blocks]
    if bad:
        raise LayerscopeError(f"saes.layers has {bad}, but this model has hidden states 0..{num_blocks}; pick from that range")
    return sorted(set(layers))


def _settings_hash(cfg: SAEsConfig, model: str, layer: int, activations: str = "") -> str:
    """What one SAE's weights and metrics depend on: the fields the step's hash covers
    (``hashed_fields``: not ``workers``), and ``activations``, the finish time of the activations
    step it read (a redo of that step, or of fine-tuning before it, gives new activations: SAEs of
    the old ones must not be resumed)."""
    from core.config import hashed_fields  # here: core.config imports this module for SAEsConfig

    blob = json.dumps({"cfg": hashed_fields(cfg), "model": model, "layer": layer, "activations": activations}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ splicing
@contextlib.contextmanager
def splice(model, layer: int, sae: SparseAutoencoder):
    """Replace hidden state ``layer`` of ``model`` by the SAE reconstruction inside the block."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output  # [batch, seq, d]
        x_hat = _reconstruct(sae, hidden)
        return (x_hat, *output[1:]) if isinstance(output, tuple) else x_hat

    _, module = hidden_state_module(model, layer)
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class SpliceRunner:
    """Class probabilities of one classifier on fixed texts, plain and with one hidden state spliced.

    Splicing hidden state ``i`` leaves states ``0..i`` as they were, so the reference pass keeps
    them and a spliced pass runs only blocks ``i+1..L`` on the SAE reconstruction: over the layers
    1..6 of a 6-block model, 2.5 blocks per pass on average instead of 6. The resumed pass is the
    model's own forward with the embeddings' output replaced by the reconstruction and the block
    list cut to the blocks above ``i``, so masks, pooler and head are the model's own; it gives the
    same probabilities as ``splice`` around a full pass (tested). When the kept states would exceed
    ``cache_bytes`` (long texts, wide models), spliced passes fall back to full passes.

    All passes run under bf16 autocast (``predict_proba(..., bf16=True)``), as the reference does.
    """

    def __init__(self, model, ids: list[list[int]], pad_id: int, layers: list[int], batch_size: int = 64, cache_bytes: int = 2 << 30):
        self.model, self.ids, self.pad_id, self.batch_size = model.eval(), ids, pad_id, batch_size
        self._lock = threading.Lock()
        self.base = base = getattr(model, model.base_model_prefix, model)
        size = sum(map(len, ids)) * model.config.hidden_size * 4 * len(layers)  # float32 states kept per layer
        resumable = hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer") and size <= cache_bytes
        self.layers = set(layers) if resumable else set()  # hidden states kept; empty = full passes only
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of similar length
        self.batches = []  # (example indices, input_ids [b, T], mask [b, T], {layer: hidden [b, T, d]})
        self.reference = torch.zeros(len(ids), model.config.num_labels)  # [n, C]
        for start in range(0, len(ids), batch_size):
            idx = order[start : start + batch_size]
            input_ids, mask = pad_batch([ids[i] for i in idx], pad_id)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=bool(self.layers))
            kept = {layer: out.hidden_states[layer] for layer in self.layers}
            self.reference[idx] = torch.softmax(out.logits.float(), -1)
            self.batches.append((idx, input_ids, mask, kept))

    def spliced(self, layer: int, sae: SparseAutoencoder) -> torch.Tensor:
        """[n, C] class probabilities with hidden state ``layer`` replaced by ``sae``'s reconstruction.

        Splices from several threads take turns: a splice cuts the model's block list or hooks one
        of its modules while it runs, so no other thread may use the model without this lock."""
        with self._lock:
            return self._spliced(layer, sae)

    def _spliced(self, layer: int, sae: SparseAutoencoder) -> torch.Tensor:
        if layer not in self.layers:
            with splice(self.model, layer, sae):
                return predict_proba(self.model, self.ids, self.pad_id, self.batch_size, bf16=True)
        base = self.base
        blocks = base.encoder.layer
        out = torch.zeros_like(self.reference)
        try:
            base.encoder.layer = blocks[layer:]  # hidden state `layer` is the output of blocks[layer - 1]
            for idx, input_ids, mask, kept in self.batches:
                hidden = kept[layer]  # [b, T, d]
                handle = base.embeddings.register_forward_hook(lambda _m, _i, _o, h=hidden: _reconstruct(sae, h))
                try:
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                finally:
                    handle.remove()
                out[idx] = torch.softmax(logits.float(), -1)
        finally:
            base.encoder.layer = blocks
        return out


def _reconstruct(sae: SparseAutoencoder, hidden: torch.Tensor) -> torch.Tensor:
    """SAE reconstruction of ``hidden [batch, seq, d]`` in its shape and dtype (what ``splice`` inserts)."""
    shape = hidden.shape
    return sae.reconstruct(hidden.reshape(-1, shape[-1]).float()).reshape(shape).to(hidden.dtype)


def fidelity(p_ref: torch.Tensor, p_spliced: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy of the spliced model and mean KL(p_ref || p_spliced) over examples.

    Reference and spliced probabilities both come from bf16-autocast passes, so the KL measures
    the splice, not rounding; a splice that moves the logits by less than bf16 resolves reads as 0
    (bf16 against fp32 passes with no splice: KL 3e-6 on the default run, README)."""
    kl = (p_ref * (p_ref.clamp_min(1e-12).log() - p_spliced.clamp_min(1e-12).log())).sum(-1)
    return {"accuracy": float((p_spliced.argmax(-1) == labels).float().mean()), "kl": float(kl.mean())}


# ------------------------------------------------------------------ the step
def _init_sample(store: ActivationStore, model: str, layer: int, n: int, pooled: bool, seed: int) -> torch.Tensor:
    rows, have = [], 0
    for batch in store.iter_batches(model, layer, min(n, 4096), epochs=1.0, seed=seed + 1, pooled=pooled):
        rows.append(batch)
        have += len(batch)
        if have >= n:
            break
    if not rows:
        raise LayerscopeError(f"no {store.split} activations for {model} layer {layer}; re-run `{core_command('activations', store.run.root, '--force')}`")
    return torch.cat(rows)[:n]


def train_one(run: RunFolder, cfg: SAEsConfig, model: str, layer: int, train: ActivationStore, hook: str, progress: bool = True) -> tuple[SparseAutoencoder, dict]:
    """Train the SAE of one (model, layer) on the train-split shards."""
    d = train.d_model
    pooled = cfg.input == "mean_pooled"
    sae_cfg = SAEConfig(
        d_in=d,
        d_sae=cfg.d_sae or cfg.expansion_factor * d,
        architecture=cfg.architecture,
        k=cfg.k,
        l1_coefficient=cfg.l1_coefficient,
        hook_name=hook,
        hidden_state_index=layer,
        model=model,
        model_path=str(run.model_dir(model).resolve()),
        model_fingerprint=model_fingerprint(run.model_dir(model)),
        input=cfg.input,
    )
    bs = cfg.training.batch_size
    total = train.num_batches(bs, cfg.epochs, pooled)
    init = _init_sample(train, model, layer, cfg.init_tokens, pooled, cfg.training.seed)

    def attempt(training: SAETrainingConfig, desc: str):
        batches = train.iter_batches(model, layer, bs, epochs=cfg.epochs, seed=cfg.training.seed + layer, pooled=pooled)
        return train_sae(sae_cfg, training, batches, init_sample=init, total_steps=total, progress=progress, desc=desc)

    # a different initialisation per (model, layer): a shared one would bias matching towards "kept"
    training = dataclasses.replace(cfg.training, seed=cfg.training.seed + 1000 * MODELS.index(model) + layer)
    if not cfg.lr_backoff:
        training = dataclasses.replace(training, dead_backoff=None)
    try:
        return attempt(training, f"SAE {model} layer {layer}")
    except DyingLatents as err:
        dying = err
    # Too high a learning rate kills latents on low-rank layers (e.g. the last layer of a fine-tuned
    # classifier): start again, same seed and data order, at a lower rate, and record it.
    lr = training.resolved_lr(sae_cfg) / cfg.lr_backoff
    sae, hist = attempt(dataclasses.replace(training, lr=lr, dead_backoff=None), f"SAE {model} layer {layer} (lr {lr:.1e})")
    hist["lr_backoff"] = {"dead_fraction": dying.dead_fraction, "at_step": dying.step}
    return sae, hist


RARE_TOKEN_COUNT = 50  # a test token is "rare" when its id occurs fewer times than this among the SAE's training tokens


def rare_token_masks(train: ActivationStore, test: ActivationStore) -> list[torch.Tensor]:
    """Per test shard, a bool mask ``[tokens]`` of the tokens whose id occurs fewer than
    ``RARE_TOKEN_COUNT`` times in the train split (where the SAEs learn): the metrics split the
    reconstruction error along it, since an SAE reconstructs words it rarely saw worst."""
    seen = torch.bincount(train.all_meta()["token_ids"].long())  # [max id + 1] occurrences per token id
    masks = []
    for s in range(test.index["num_shards"]):
        ids = test.meta(s)["token_ids"].long()
        counts = torch.zeros_like(ids)
        known = ids < len(seen)
        counts[known] = seen[ids[known]]
        masks.append(counts < RARE_TOKEN_COUNT)
    return masks


def run_saes(run: RunFolder, cfg: SAEsConfig, model_cfg: ModelConfig, progress: bool = True, resume: bool = True) -> dict:
    """Train and evaluate every SAE of the run. Returns the step record.

    With ``resume``, an SAE folder left by an interrupted run with the same settings is kept.
    """
    quiet_transformers()
    cfg.validate()
    train, test = ActivationStore(run, "train"), ActivationStore(run, "test")
    rows = train.index["num_examples" if cfg.input == "mean_pooled" else "num_tokens"]
    if cfg.training.batch_size > rows:  # no batch would ever fill: the stream would gather rows until memory runs out
        raise LayerscopeError(f"saes.training.batch_size={cfg.training.batch_size} is more than the {rows:,} training rows ({'texts' if cfg.input == 'mean_pooled' else 'tokens'}); lower it (default 2048) or extract more with activations.sae_examples")
    check_memory(cfg, train.d_model)
    layers = resolve_layers(cfg, train.num_layers - 1)
    train.require_layers(layers)
    splice_texts = load_split(run, "test")
    if cfg.splice_examples and len(splice_texts) > cfg.splice_examples:
        splice_texts = splice_texts.sample(n=cfg.splice_examples, random_state=0).sort_values("id")
    tokenizer = load_tokenizer(str(run.model_dir("finetuned")))
    ids = encode(tokenizer, splice_texts["text"].tolist(), model_cfg.max_length, model_cfg.truncation)
    y = torch.tensor(splice_texts["label"].tolist())
    # Every SAE is judged inside the fine-tuned classifier; both models share its module names.
    classifier = load_classifier(str(run.model_dir("finetuned"))).eval()
    runner = SpliceRunner(classifier, ids, tokenizer.pad_token_id, layers) if cfg.splice_examples != 0 else None

    rare = rare_token_masks(train, test)

    jobs = [(m, l) for m in MODELS for l in layers]
    extracted = run.manifest().get("steps", {}).get("activations", {}).get("finished", "")
    settings = {job: _settings_hash(cfg, *job, extracted) for job in jobs}
    done = {key: kept for key in jobs if resume and (kept := _finished(run, *key, settings[key]))}

    # Read before any job starts: a splice in one job cuts the classifier's block list while it runs.
    hooks = {layer: hidden_state_module(classifier, layer)[0] for layer in layers}

    def job(key: tuple[str, int]) -> dict:
        """Train, evaluate and save one SAE (several run side by side: see ``core.threads``).
        Touches the shared classifier only through ``runner.spliced``, which takes a lock."""
        model, layer = key
        sae, history = train_one(run, cfg, model, layer, train, hooks[layer], progress)
        metrics = {"model": model, "layer": layer, "architecture": cfg.architecture, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k if cfg.architecture == "topk" else None}
        metrics.update(evaluate_sae(sae, test.iter_layer(model, layer), rare=rare))
        metrics["rare_tokens"]["seen_fewer_than"] = RARE_TOKEN_COUNT
        if model == "pretrained":
            metrics["fvu_on_finetuned"] = evaluate_sae(sae, test.iter_layer("finetuned", layer))["fvu"]
        if runner is not None:
            f = fidelity(runner.reference, runner.spliced(layer, sae), y)
            metrics.update(accuracy_spliced=f["accuracy"], kl_spliced=f["kl"], accuracy_original=float((runner.reference.argmax(-1) == y).float().mean()), splice_texts=len(y), spliced_into="finetuned")
        metrics["training"] = {k: history[k] for k in ("num_steps", "num_tokens", "tokens_per_second", "dead_fraction", "lr", "normalization_scale")}
        metrics["training"]["lr_backoff"] = history.get("lr_backoff")  # set when dying latents forced a restart at a lower lr
        metrics["loss_curve"] = {"step": history["step"], "mse": history["mse"], "l0": history["l0"]}
        metrics["settings_hash"] = settings[key]
        with atomic_path(run.sae_dir(model, layer)) as tmp:
            sae.save(tmp)
            write_json(tmp / SAE_METRICS_FILE, metrics)
        return metrics

    with progress_bar(total=len(jobs), initial=len(done), desc="SAEs", unit="sae", show=progress) as bar:
        for key, metrics in run_side_by_side(job, [j for j in jobs if j not in done], cfg.workers):
            done[key] = metrics
            bar.update()
    summaries = [done[j] for j in jobs]
    return {"layers": layers, "saes": [{k: s.get(k) for k in ("model", "layer", "fvu", "l0", "dead_fraction", "accuracy_spliced")} for s in summaries]}


def _finished(run: RunFolder, model: str, layer: int, settings_hash: str) -> dict | None:
    """The metrics of an SAE a resumed step keeps: written with the same settings, and a folder
    that loads. None otherwise: an SAE whose files an interruption or a disk left damaged is
    trained again, not recorded as done (a missing metrics.json too: read_json raises)."""
    try:
        kept = read_json(run.sae_metrics_path(model, layer), SAE_METRICS_FIELDS)
        if kept.get("settings_hash") != settings_hash:
            return None
        load_sae(run, model, layer)
    except LayerscopeError:
        return None
    return kept


def load_sae(run: RunFolder, model: str, layer: int, hidden_size: int | None = None) -> SparseAutoencoder:
    """The run's SAE for ``model`` at ``layer``, checked against the run (see ``check_run_sae``)."""
    folder = run.sae_dir(model, layer)
    if not (folder / SAE_CFG_FILE).is_file():
        run.require("saes", "loading an SAE")
        raise LayerscopeError(f"no SAE for {model} layer {layer} in {run.root}; available: {[(m, l) for m, l, _ in run.sae_dirs()]}")
    try:
        return check_run_sae(run, model, SparseAutoencoder.load(folder), hidden_size, layer)
    except LayerscopeError as e:  # SparseAutoencoder.load knows no run: its fix gets this run's folder
        raise LayerscopeError(str(e).replace(RETRAIN_HINT, retrain_hint(run.root))) from None


def check_run_sae(run: RunFolder, model: str, sae: SparseAutoencoder, hidden_size: int | None = None, layer: int | None = None) -> SparseAutoencoder:
    """LayerscopeError unless ``sae`` (found under the run's ``model`` SAEs, in the folder of
    ``layer``) was trained on this run's ``model`` at that layer."""
    check_compatible(sae, hidden_size or sae.cfg.d_in)
    if sae.cfg.model != model:
        raise LayerscopeError(f"SAE at {sae.path} was trained on the {sae.cfg.model} model but sits among the {model} SAEs; {retrain_hint(run.root)}")
    trained_at = sae.cfg.hidden_state_index
    if layer is not None and trained_at != layer:
        raise LayerscopeError(f"SAE at {sae.path} was trained on hidden state {trained_at} but sits in the folder of layer {layer}; move it back to layer_{trained_at}, or {retrain_hint(run.root)}")
    check_compatible(sae, sae.cfg.d_in, fingerprint=model_fingerprint(run.model_dir(model)))
    return sae
