"""``python -m bench.sae_data``: how one SAE's held-out FVU moves with its training tokens,
its width, its epochs and its learning rate (README "Every SAE bar met").

    python -m bench.sae_data --run checkpoints/default --model pretrained --layer 6

It extracts the chosen hidden state for texts of the run's dataset that are in none of its
splits (``--extra-texts``, or texts from another CSV with ``--texts``), then trains the run's
TopK SAE recipe for each setting on the run's training tokens plus the first ``extra`` of those
tokens, a fresh shuffle of all of them every epoch, and scores it on the run's test tokens.
The run's dying-latents restart is off, so the dead share shows as it is. Prints a table and
writes ``--out`` (JSON).

A setting is ``extra:latents:epochs:lr``; ``extra`` is a token count or ``all``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from core.activations import DTYPES, ActivationStore, hidden_states, plan_batches
from core.config import saved_config
from core.data import DataConfig, clean_text, load_raw, load_split
from core.errors import LayerscopeError
from core.models import encode, load_classifier, load_tokenizer, pad_batch
from core.progress import progress_bar
from core.files import write_json
from core.runfolder import MODELS, SPLITS, RunFolder, now
from core.sae import SAEConfig
from core.sae_metrics import evaluate_sae
from core.sae_training import train_sae

DEFAULT_SETTINGS = "0:1536:3:4e-3,400000:1536:3:4e-3,all:1536:1:4e-3,all:1536:3:4e-3,all:1536:6:4e-3,all:3072:3:4e-3,all:3072:3:2e-3"


@dataclasses.dataclass
class Setting:
    extra: int | None  # extra tokens on top of the run's training tokens; None = all extracted
    latents: int
    epochs: float
    lr: float


def parse_settings(text: str) -> list[Setting]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            extra, latents, epochs, lr = item.split(":")
            setting = Setting(None if extra == "all" else int(extra), int(latents), float(epochs), float(lr))
        except ValueError:
            raise LayerscopeError(f"setting '{item}' is not extra:latents:epochs:lr (e.g. all:3072:3:2e-3)") from None
        if (setting.extra or 0) < 0 or min(setting.latents, setting.epochs, setting.lr) <= 0:
            raise LayerscopeError(f"setting '{item}' needs extra >= 0 and latents, epochs and lr > 0 (e.g. all:3072:3:2e-3)")
        out.append(setting)
    if not out:
        raise LayerscopeError("no settings given; pass --settings extra:latents:epochs:lr[,...]")
    return out


def texts_outside(run: RunFolder, data_cfg: DataConfig, n: int, seed: int, csv: str | None = None) -> list[str]:
    """Up to ``n`` cleaned texts of the run's dataset (or of ``csv``) that are in none of its splits."""
    used = set().union(*(set(load_split(run, s)["text"]) for s in SPLITS))
    source = dataclasses.replace(data_cfg, dataset=csv) if csv else data_cfg
    raw, _ = load_raw(source)
    pool = sorted({t for t in (clean_text(str(x), data_cfg) for x in raw["text"]) if t and t not in used})
    if not pool:
        raise LayerscopeError(f"the dataset '{source.dataset}' has no texts outside the run's splits; pass --texts OTHER.csv")
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


@torch.no_grad()
def extract_layer(model, tokenizer, ids: list[list[int]], layer: int, compute_dtype: str, dtype: torch.dtype = torch.float16, batch_tokens: int = 8192) -> torch.Tensor:
    """Hidden state ``layer`` of every real token of ``ids`` -> [tokens, d] in ``dtype`` (the run's
    storage dtype), texts in the order of ``ids`` (batched by length as the activations step does)."""
    lengths = [len(x) for x in ids]
    rows: list[torch.Tensor | None] = [None] * len(ids)
    bar = progress_bar(total=sum(lengths), unit="tok", unit_scale=True, desc=f"layer {layer}")
    for batch in plan_batches(lengths, batch_tokens):
        x, mask = pad_batch([ids[i] for i in batch], tokenizer.pad_token_id)
        h = hidden_states(model, x, mask, compute_dtype)[layer]  # [batch, seq, d]
        for r, i in enumerate(batch):
            rows[i] = h[r, : lengths[i]].to(dtype)
        bar.update(int(mask.sum()))
    bar.close()
    return torch.cat(rows)


def shuffled_batches(x: torch.Tensor, batch_size: int, epochs: float, gen: torch.Generator):
    """Batches [batch_size, d] (float32) of a fresh permutation of ``x`` each epoch; ``epochs`` may be fractional."""
    left = int(len(x) * epochs)
    while left >= batch_size:
        perm = torch.randperm(len(x), generator=gen)[: min(len(x), left)]
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield x[perm[i : i + batch_size]].float()
        left -= len(perm)


def train_and_score(run_cfg, test: ActivationStore, x: torch.Tensor, model: str, layer: int, s: Setting, seed: int) -> dict:
    sae_cfg = SAEConfig(d_in=x.shape[1], d_sae=s.latents, architecture="topk", k=run_cfg.saes.k, hidden_state_index=layer, model=model)
    training = dataclasses.replace(run_cfg.saes.training, lr=s.lr, seed=seed, dead_backoff=None)
    gen = torch.Generator().manual_seed(seed)
    init = x[torch.randperm(len(x), generator=gen)[: run_cfg.saes.init_tokens]].float()
    steps = int(len(x) * s.epochs) // training.batch_size
    t0 = time.perf_counter()
    sae, hist = train_sae(sae_cfg, training, shuffled_batches(x, training.batch_size, s.epochs, gen), init_sample=init, total_steps=steps, desc=f"SAE {s.latents}")
    seconds = time.perf_counter() - t0
    ev = evaluate_sae(sae, test.iter_layer(model, layer))
    return {"tokens": len(x), **dataclasses.asdict(s), "steps": hist["num_steps"], "fvu": ev["fvu"], "l0": ev["l0"], "dead_fraction": ev["dead_fraction"], "seconds": seconds}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.sae_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="checkpoints/default", help="a built run (default: checkpoints/default)")
    p.add_argument("--model", default="pretrained", choices=MODELS)
    p.add_argument("--layer", type=int, default=6, help="hidden-state index the SAE reads (default 6)")
    p.add_argument("--extra-texts", type=int, default=8000, help="texts outside the run to extract (default 8000)")
    p.add_argument("--texts", default=None, help="take them from this CSV (a text column named as the run's data.text_column) instead of the run's dataset")
    p.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"extra:latents:epochs:lr, comma-separated (default {DEFAULT_SETTINGS})")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--out", default="bench/sae_data.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = parse_settings(args.settings)
        if args.extra_texts < 1:
            raise LayerscopeError(f"--extra-texts {args.extra_texts}: extract at least 1 text (settings with extra 0 train on the run's tokens alone)")
        run = RunFolder(args.run)
        run.require("activations", "bench.sae_data")
        cfg = saved_config(run)
        small = [s.latents for s in settings if s.latents < cfg.saes.k]
        if small:
            raise LayerscopeError(f"a setting has {small[0]} latents, fewer than the run's k = {cfg.saes.k} active ones; give each at least {cfg.saes.k}")
        store, test = ActivationStore(run, "train"), ActivationStore(run, "test")
        store.require_layers([args.layer])
        texts = texts_outside(run, cfg.data, args.extra_texts, args.seed, args.texts)
        tokenizer = load_tokenizer(str(run.model_dir(args.model)))
        ids = encode(tokenizer, texts, cfg.model.max_length, cfg.model.truncation)
        model = load_classifier(str(run.model_dir(args.model))).eval()
        dtype = DTYPES[cfg.activations.storage_dtype]  # as the run's shards hold them
        extra = extract_layer(model, tokenizer, ids, args.layer, cfg.activations.compute_dtype, dtype)
        base = store.load_layer(args.model, args.layer, dtype=dtype)
    except LayerscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model} layer {args.layer}: {len(base):,} training tokens of the run, {len(extra):,} more from {len(texts):,} texts outside it; test tokens {test.num_tokens:,}")
    print(f"{'tokens':>10} {'latents':>7} {'epochs':>6} {'lr':>7} {'FVU':>6} {'dead':>6} {'seconds':>7}")
    rows = []
    for s in settings:
        x = torch.cat([base, extra if s.extra is None else extra[: s.extra]])
        try:
            row = train_and_score(cfg, test, x, args.model, args.layer, s, args.seed)
        except LayerscopeError as e:  # a setting the trainer refuses
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows.append(row)
        print(f"{row['tokens']:>10,} {s.latents:>7} {s.epochs:>6g} {s.lr:>7g} {row['fvu']:>6.3f} {row['dead_fraction']:>6.1%} {row['seconds']:>7.0f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"command": "python -m bench.sae_data " + " ".join(argv if argv is not None else sys.argv[1:]), "date": now(), "run": str(run.root), "model": args.model, "layer": args.layer, "run_tokens": len(base), "extra_tokens": len(extra), "extra_texts": len(texts), "threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
