"""Step ``activations``: hidden states of every layer of both models, token level, as shards.

For each sampled split (``train`` feeds the SAEs, ``test`` feeds similarity, SAE
evaluation and feature analysis) texts are tokenised with the run's truncation rule,
sorted by length, batched under a token budget (dynamic padding), the batches
shuffled (seeded, so every shard is a random mix of the texts), and run through
the pre-trained and the fine-tuned model. Only real tokens are kept (padding is
dropped); [CLS]/[SEP] are kept and marked. Shards hold whole examples:

    tokens_00007.safetensors      example_ids [n] int32, token_ids [n] int32, positions [n] int32, special [n] bool
    pretrained_00007.safetensors  layer_0 .. layer_L  [n, d_model] (float16 by default)
    finetuned_00007.safetensors   same tokens, same order

so memory stays bounded by one shard however large the sample, and any row traces
back to (example id, position) -> its text in data/<split>.csv.

Under ``torchrun`` / ``accelerate launch`` each process extracts every world_size-th
shard of a plan fixed in advance, so the files are identical to a single-process run.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from core.data import load_split
from core.errors import LayerscopeError, OptionCheck
from core.models import ModelConfig, encode, load_classifier, load_tokenizer, num_hidden_states, pad_batch, quiet_transformers
from core.progress import progress_bar
from core.rss import kept_heap
from core.files import atomic_path, refuse_unreadable, write_json
from core.runfolder import ACTIVATION_INDEX_FIELDS, MODELS, RunFolder, core_command, read_json

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ActivationsConfig:
    sae_examples: int = 2000  # texts sampled from the train split (SAE training data); 0 = all
    eval_examples: int = 400  # texts sampled from the test split (similarity, SAE evaluation, features); 0 = all
    batch_tokens: int = 8192  # padded tokens per forward pass (dynamic padding after sorting by length)
    shard_mb: int = 96  # approximate size of one model's shard on disk (bounds memory); 0 = one batch per shard
    compute_dtype: str = "bfloat16"  # autocast dtype for the forward passes: "bfloat16" (fast) or "float32" (exact)
    storage_dtype: str = "float16"  # dtype of stored hidden states: "float16" or "float32"
    seed: int = 0  # seeds the text sample
    train_layers: list[int] = field(default_factory=list, metadata={"hash_when_set": True})  # hidden states kept for the train split (only the SAEs read it); [] = all

    def validate(self) -> None:
        check = OptionCheck("activations", self)
        check.seed("seed")
        check.at_least(0, "sae_examples", "eval_examples")
        check.at_least(1, "batch_tokens")
        check.at_least(0, "shard_mb")
        check.choice("compute_dtype", "bfloat16", "float32")
        check.choice("storage_dtype", "float16", "float32")
        check.indices("train_layers")


# ------------------------------------------------------------------ planning
def plan_batches(lengths: list[int], batch_tokens: int, seed: int | None = None) -> list[np.ndarray]:
    """Group example indices into batches whose padded size fits the budget, sorted by length so
    that each batch pads little (longest first).

    With ``seed``, texts of equal length are taken in a seeded random order and the batches are
    shuffled, so every batch, and every shard of consecutive batches, is a random sample of the
    texts. The SAE trainer streams one shard at a time; without this, a dataset stored by class
    (IMDb: every negative review, then every positive one) and truncated to one length gave
    shards of a single class, and the trainer then saw dozens of single-class batches in a row.
    The padding is the same either way: the batches hold the same lengths.
    """
    rng = np.random.default_rng(seed) if seed is not None else None
    lengths_arr = np.asarray(lengths)
    start = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    order = start[np.argsort(-lengths_arr[start], kind="stable")]  # by length; ties in ``start`` order
    batches = _fill_batches(order, lengths, batch_tokens)
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _fill_batches(order: np.ndarray, lengths: list[int], batch_tokens: int) -> list[np.ndarray]:
    """Consecutive runs of ``order`` whose padded size (rows x longest) fits ``batch_tokens``."""
    batches, current, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if current and w * (len(current) + 1) > batch_tokens:
            batches.append(np.asarray(current))
            current, w = [], lengths[i]
        current.append(i)
        width = w
    if current:
        batches.append(np.asarray(current))
    return batches


def plan_shards(batches: list[np.ndarray], lengths: list[int], shard_tokens: int) -> list[list[np.ndarray]]:
    """Consecutive batches grouped into shards of about ``shard_tokens`` real tokens."""
    shards, current, n = [], [], 0
    for b in batches:
        current.append(b)
        n += int(sum(lengths[i] for i in b))
        if n >= shard_tokens:
            shards.append(current)
            current, n = [], 0
    if current:
        shards.append(current)
    return shards


def sample_split(run: RunFolder, split: str, n: int, seed: int):
    frame = load_split(run, split)
    if n and len(frame) > n:
        frame = frame.sample(n=n, random_state=seed).sort_values("id").reset_index(drop=True)
    return frame


# ------------------------------------------------------------------ extraction
@torch.no_grad()
def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, compute_dtype: str) -> tuple[torch.Tensor, ...]:
    """All hidden states (embeddings first), each [batch, seq, d_model]."""
    device_type = input_ids.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states


def _extract_shard(models: dict, tokenizer, ids, example_ids, batches, cfg: ActivationsConfig, buffers: dict) -> tuple[dict, dict]:
    """Run one shard's batches through both models. Returns (token meta, {model: {layer_i: [n, d]}}).

    Real-token rows are copied straight from each hidden state into ``buffers``
    ({model: {layer_i: [capacity, d]}}, reused from shard to shard: fresh memory costs a page fault
    per 4 KiB), cast to the storage dtype on the way; the returned tensors are views of them.
    Hidden states without a buffer are not kept.
    """
    rows = [i for b in batches for i in b]  # examples in shard order
    lengths = [len(ids[i]) for i in rows]
    n = sum(lengths)
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    token_ids = torch.as_tensor([t for i in rows for t in ids[i]], dtype=torch.int32)
    meta = {
        "example_ids": torch.as_tensor(np.repeat(example_ids[rows], lengths), dtype=torch.int32),
        "token_ids": token_ids,
        "positions": torch.as_tensor(np.concatenate([np.arange(k) for k in lengths]), dtype=torch.int32),
        "special": torch.isin(token_ids, special_ids),
    }
    offset = 0
    for b in batches:
        input_ids, mask = pad_batch([ids[i] for i in b], tokenizer.pad_token_id)
        for name, model in models.items():
            states = hidden_states(model, input_ids, mask, cfg.compute_dtype)  # each [batch, seq, d]
            for layer, h in enumerate(states):
                out, at = buffers[name].get(f"layer_{layer}"), offset
                if out is None:
                    continue
                for r, i in enumerate(b):
                    k = len(ids[i])
                    out[at : at + k].copy_(h[r, :k])  # real tokens only, cast on copy
                    at += k
        offset += sum(len(ids[i]) for i in b)
    return meta, {name: {key: buf[:n] for key, buf in layers.items()} for name, layers in buffers.items()}


def check_layers(layers: list[int] | None, n_states: int) -> list[int]:
    """The sorted hidden-state indices to keep (all when ``layers`` is empty); LayerscopeError if out of range."""
    if not layers:
        return list(range(n_states))
    bad = sorted({l for l in layers if not isinstance(l, int) or not 0 <= l < n_states})
    if bad:
        raise LayerscopeError(f"activations.train_layers has {bad}, but this model has hidden states 0..{n_states - 1}; pick from that range or leave it empty (all)")
    return sorted(set(layers))


META_BYTES_PER_TOKEN = 13  # a token shard's example id, token id, position (int32 each) and special flag (bool)


def hidden_bytes_per_token(num_layers: int, d_model: int, storage_dtype: str) -> int:
    """Bytes one model's kept hidden states take per token."""
    return num_layers * d_model * torch.finfo(DTYPES[storage_dtype]).bits // 8


def split_bytes(num_tokens: int, num_layers: int, d_model: int, storage_dtype: str, num_models: int = len(MODELS)) -> int:
    """Bytes the shards of one split take on disk (tensor data; each file's JSON header adds ~1 KB)."""
    return num_tokens * (num_models * hidden_bytes_per_token(num_layers, d_model, storage_dtype) + META_BYTES_PER_TOKEN)


SHARD_HEADROOM = 256 << 20  # the shard being written beside the one it replaces, and the rest of the run's files


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def check_disk_space(folder: Path, needed: dict[str, int], hint: str) -> None:
    """Refuse, before anything is written, an extraction whose shards ({split: bytes}) the file system
    holding ``folder`` cannot take. Shards already in ``folder`` count as free: each is replaced
    (written under a temporary name, then renamed), so one shard's worth is added as headroom."""
    probe = folder
    while not probe.exists():  # the run folder may not have its activations/ yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    replaced = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) if folder.exists() else 0
    total = sum(needed.values())
    if total + SHARD_HEADROOM > free + replaced:
        parts = ", ".join(f"{split} {_gb(b)}" for split, b in needed.items())
        raise LayerscopeError(
            f"not enough disk space for the activations: they take about {_gb(total)} ({parts}) in {folder}, and its "
            f"file system has {_gb(free)} free{f' (+{_gb(replaced)} of older shards they replace)' if replaced else ''}; "
            f"free some space, or write less: {hint}"
        )


def plan_split(run: RunFolder, split: str, n_examples: int, cfg: ActivationsConfig, model_cfg: ModelConfig, tokenizer) -> tuple:
    """The texts of one split and their token ids: (frame, ids)."""
    frame = sample_split(run, split, n_examples, cfg.seed)
    return frame, encode(tokenizer, frame["text"].tolist(), model_cfg.max_length, model_cfg.truncation)


@kept_heap()  # each batch reuses the heap pages the previous one freed (core.rss)
def extract_split(run: RunFolder, split: str, n_examples: int, cfg: ActivationsConfig, model_cfg: ModelConfig, models: dict, tokenizer, state=None, layers: list[int] | None = None, planned: tuple | None = None) -> dict:
    """Extract one split into run/activations/<split>/. Returns its index (also written as index.json).

    ``layers``: the hidden-state indices to keep (None or [] = all of them). ``planned``: what
    ``plan_split`` returned for this split, if the caller has it already.
    """
    frame, ids = planned or plan_split(run, split, n_examples, cfg, model_cfg, tokenizer)
    lengths = [len(x) for x in ids]
    example_ids = frame["id"].to_numpy()
    any_model = next(iter(models.values()))
    n_states, d_model = num_hidden_states(any_model), any_model.config.hidden_size
    keep = check_layers(layers, n_states)
    bytes_per_token = hidden_bytes_per_token(len(keep), d_model, cfg.storage_dtype)
    shard_tokens = max(1, cfg.shard_mb * 2**20 // bytes_per_token)  # shard_mb=0: one batch per shard
    shards = plan_shards(plan_batches(lengths, cfg.batch_tokens, seed=cfg.seed), lengths, shard_tokens)  # shards of randomly mixed texts

    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    mine = range(rank, len(shards), world)
    out_dir = run.activations_dir(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bar = progress_bar(total=sum(lengths[i] for s in mine for b in shards[s] for i in b), unit="tok", unit_scale=True, desc=f"activations {split}", show=rank == 0)
    # Shard s is written by a background thread while shard s+1 is computed, so two sets of output
    # buffers alternate: set j % 2 is refilled only after the write that used it has finished.
    capacity = max((sum(lengths[i] for b in shards[s] for i in b) for s in mine), default=0)
    buffer_sets: list[dict | None] = [None, None]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        pending = None
        for j, s in enumerate(mine):
            if buffer_sets[j % 2] is None:
                block = {m: torch.empty(len(keep), capacity, d_model, dtype=DTYPES[cfg.storage_dtype]) for m in models}  # one large block each
                buffer_sets[j % 2] = {m: {f"layer_{i}": block[m][slot] for slot, i in enumerate(keep)} for m in models}
            meta, hidden = _extract_shard(models, tokenizer, ids, example_ids, shards[s], cfg, buffer_sets[j % 2])
            if pending is not None:
                pending.result()  # re-raises a failed write here
            pending = writer.submit(_write_shard, run, split, s, meta, hidden)
            bar.update(len(meta["token_ids"]))
        if pending is not None:
            pending.result()
    bar.close()
    if state is not None:
        state.wait_for_everyone()
    index = {
        "split": split,
        "num_shards": len(shards),
        "shard_tokens": [sum(lengths[i] for b in sh for i in b) for sh in shards],
        "num_tokens": int(sum(lengths)),
        "num_examples": len(frame),
        "num_hidden_states": n_states,
        "layers": keep,
        "d_model": d_model,
        "models": list(models),
        "storage_dtype": cfg.storage_dtype,
        "compute_dtype": cfg.compute_dtype,
        "seconds": time.perf_counter() - t0,
    }
    if rank == 0:
        write_json(run.activation_index(split), index)
    return index


def _write_shard(run: RunFolder, split: str, s: int, meta: dict, hidden: dict) -> None:
    for name, tensors in hidden.items():
        _save(run.hidden_shard(split, name, s), tensors)
    _save(run.token_shard(split, s), meta)  # written last: its presence marks the shard complete


def _save(path, tensors: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def run_activations(run: RunFolder, cfg: ActivationsConfig, model_cfg: ModelConfig) -> dict:
    """Extract the train sample and the test sample for both models. Returns the step record."""
    from accelerate import PartialState

    quiet_transformers()
    cfg.validate()  # dtypes among others (a config built in code skipped load_config's checks)
    classes = len(run.labels())
    if 0 < cfg.eval_examples < classes:  # every AUROC would be undefined, and the selectivity ranking silently the feature order
        raise LayerscopeError(
            f"activations.eval_examples={cfg.eval_examples} is fewer than the {classes} classes: the test sample needs texts of every class "
            f"for the features' selectivity and per-class means; use at least {classes} (default 400), or 0 for the whole test split"
        )
    state = PartialState()
    device = state.device
    tokenizer = load_tokenizer(str(run.model_dir("finetuned")))
    models = {m: load_classifier(str(run.model_dir(m))).to(device).eval() for m in MODELS}
    any_model = next(iter(models.values()))
    n_states, d_model = num_hidden_states(any_model), any_model.config.hidden_size
    splits = {"train": (cfg.sae_examples, check_layers(cfg.train_layers, n_states)), "test": (cfg.eval_examples, list(range(n_states)))}
    planned = {split: plan_split(run, split, n, cfg, model_cfg, tokenizer) for split, (n, _) in splits.items()}
    needed = {split: split_bytes(sum(map(len, planned[split][1])), len(keep), d_model, cfg.storage_dtype, len(models)) for split, (_, keep) in splits.items()}
    hint = (
        f"fewer training texts (--set activations.sae_examples=N, now {cfg.sae_examples or 'all'}), "
        + ("only the SAE layers in the train split (--set activations.train_layers=3,6), " if not cfg.train_layers else "")
        + "or a --run folder on a larger disk"
    )
    check_disk_space(run.activations_root(), needed, hint)
    record = {}
    for split, (n, _) in splits.items():
        idx = extract_split(run, split, n, cfg, model_cfg, models, tokenizer, state, layers=cfg.train_layers if split == "train" else None, planned=planned.pop(split))
        record[split] = {"tokens": idx["num_tokens"], "examples": idx["num_examples"], "tokens_per_second": idx["num_tokens"] / max(idx["seconds"], 1e-9)}
    return record


# ------------------------------------------------------------------ reading back
def _index_problem(index: dict) -> str | None:
    """What an index.json says that no extraction writes (a file edited by hand), or None."""
    if index["num_shards"] < 1 or index["num_tokens"] < 1 or index["num_examples"] < 1:
        return f"num_shards {index['num_shards']}, num_tokens {index['num_tokens']}, num_examples {index['num_examples']}; an extraction writes at least one of each"
    if index["d_model"] < 1 or index["num_hidden_states"] < 2:
        return f"d_model {index['d_model']}, num_hidden_states {index['num_hidden_states']}; a model has a width and at least two hidden states"
    sizes = index.get("shard_tokens")
    if sizes is not None and (len(sizes) != index["num_shards"] or sum(sizes) != index["num_tokens"]):
        return f"shard_tokens lists {len(sizes)} shards of {sum(sizes)} tokens, but num_shards is {index['num_shards']} and num_tokens {index['num_tokens']}"
    return None


class ActivationStore:
    """Read access to one split's shards."""

    def __init__(self, run: RunFolder, split: str):
        self.run, self.split = run, split
        path = run.activation_index(split)
        if not path.is_file():
            run.require("activations", "reading activations")
            raise LayerscopeError(f"{path} is missing; re-run `{core_command('activations', run.root, '--force')}`")
        self.index = read_json(path, ACTIVATION_INDEX_FIELDS)
        problem = _index_problem(self.index)
        if problem:
            raise LayerscopeError(f"{path} is damaged ({problem}); re-run `{core_command('activations', run.root, '--force')}`")

    @property
    def num_layers(self) -> int:
        return self.index["num_hidden_states"]

    @property
    def layers(self) -> list[int]:
        """Hidden-state indices stored in this split (all of them unless ``activations.train_layers`` chose)."""
        return self.index.get("layers", list(range(self.num_layers)))

    def require_layers(self, layers) -> None:
        """LayerscopeError naming the fix unless every hidden state in ``layers`` was stored."""
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise LayerscopeError(
                f"the {self.split} activations hold hidden states {self.layers} only, not {missing} "
                f"(activations.train_layers); add them there and re-run `{core_command('activations', self.run.root, '--force')}`, "
                "or ask for stored layers only"
            )

    @property
    def d_model(self) -> int:
        return self.index["d_model"]

    @property
    def num_tokens(self) -> int:
        return self.index["num_tokens"]

    def _open(self, path):
        if not path.is_file():
            raise LayerscopeError(f"activation shard {path} is missing; re-run `{core_command('activations', self.run.root, '--force')}`")
        refuse_unreadable(path)
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise LayerscopeError(f"activation shard {path} is damaged ({e}); re-run `{core_command('activations', self.run.root, '--force')}`") from None

    def meta(self, shard: int) -> dict[str, torch.Tensor]:
        with self._open(self.run.token_shard(self.split, shard)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def layer(self, model: str, shard: int, layer: int) -> torch.Tensor:
        """[n, d_model] hidden state ``layer`` of one shard, as stored."""
        with self._open(self.run.hidden_shard(self.split, model, shard)) as f:
            key = f"layer_{layer}"
            if key not in f.keys():
                self.require_layers([layer])
                raise LayerscopeError(f"shard has no {key}; layers are 0..{self.num_layers - 1}")
            t = f.get_tensor(key)
        redo = f"re-run `{core_command('activations', self.run.root, '--force')}`"
        if t.shape[0] == 0:
            raise LayerscopeError(f"activation shard {shard} of {self.split}/{model} is empty; {redo}")
        path = self.run.hidden_shard(self.split, model, shard)
        if t.ndim != 2 or t.shape[1] != self.d_model:
            raise LayerscopeError(f"activation shard {path} holds {key} of shape {tuple(t.shape)}, not [tokens, {self.d_model}] as its index.json says; {redo}")
        expected = self.index.get("shard_tokens", [None] * (shard + 1))[shard]  # absent in runs built before it was recorded
        if expected is not None and t.shape[0] != expected:  # a shard of another split or run copied over this one
            raise LayerscopeError(f"activation shard {path} holds {t.shape[0]} tokens, but its index.json says {expected}: it was replaced since the step wrote it; {redo}")
        return t

    def all_meta(self) -> dict[str, torch.Tensor]:
        metas = [self.meta(s) for s in range(self.index["num_shards"])]
        return {k: torch.cat([m[k] for m in metas]) for k in metas[0]}

    def load_layer(self, model: str, layer: int, dtype=torch.float32) -> torch.Tensor:
        """Every token of one layer, [num_tokens, d_model] (use for evaluation-sized splits)."""
        return torch.cat([self.layer(model, s, layer).to(dtype) for s in range(self.index["num_shards"])])

    def iter_layer(self, model: str, layer: int, dtype=torch.float32) -> Iterator[torch.Tensor]:
        for s in range(self.index["num_shards"]):
            yield self.layer(model, s, layer).to(dtype)

    def iter_batches(self, model: str, layer: int, batch_size: int, *, epochs: float = 1.0, seed: int = 0, pooled: bool = False) -> Iterator[torch.Tensor]:
        """Shuffled training batches [batch_size, d_model] (float32), streaming one shard at a time.

        Shuffles shard order each pass and rows within (leftover + one shard); yields
        floor(epochs * rows / batch_size) full batches, so one epoch never repeats a row. A batch
        is thus drawn from one or two shards, which are random samples of the texts because
        extraction plans them with a seed (``plan_batches``). ``pooled`` yields per-example mean vectors instead of tokens.
        Rows are shuffled in the stored dtype and each batch converted on its way out (exact for
        fp16 and bf16): whole-shard float32 copies would be fresh tens of MB per shard.
        """
        gen = torch.Generator().manual_seed(seed)
        total = self.num_batches(batch_size, epochs, pooled)
        emitted = 0
        leftover = None
        while emitted < total:
            for s in torch.randperm(self.index["num_shards"], generator=gen).tolist():
                x = self.layer(model, s, layer)  # [n, d] as stored
                if pooled:
                    x = mean_pool(x.float(), self.meta(s)["example_ids"])
                if leftover is not None:
                    x = torch.cat([leftover, x])
                x = x[torch.randperm(len(x), generator=gen)]
                full = len(x) // batch_size * batch_size
                for i in range(0, full, batch_size):
                    yield x[i : i + batch_size].float()
                    emitted += 1
                    if emitted >= total:
                        return
                leftover = x[full:]

    def num_batches(self, batch_size: int, epochs: float = 1.0, pooled: bool = False) -> int:
        """How many batches ``iter_batches`` yields with these arguments."""
        return max(1, int(epochs * (self.index["num_examples"] if pooled else self.num_tokens) // batch_size))


def mean_pool(x: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
    """[n_tokens, d] -> [n_examples_in_shard, d] mean over each example's tokens (in order of first appearance)."""
    uniq, inverse = torch.unique_consecutive(example_ids, return_inverse=True)
    sums = torch.zeros(len(uniq), x.shape[1], dtype=torch.float64).index_add_(0, inverse, x.double())
    counts = torch.bincount(inverse, minlength=len(uniq)).double()[:, None]
    return (sums / counts).to(x.dtype)
