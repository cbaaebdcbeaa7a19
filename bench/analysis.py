"""Sentence analysis: what the dashboard computes when the user presses Enter, against two forward passes.

Bundle: ``core.analysis.load_bundle`` on the bench run (embedded MiniLM as both models) with a
TopK SAE (1,536 latents, k=32, the default) on every hidden state 1..6 of both models: 12 SAEs,
the default run's full set. The SAE weights are freshly initialised: timing depends on shapes only.

Measured, per sentence of 16 and of 64 tokens (IMDb text cut to length), median of repeated
runs after a warm-up: ``sentence_state`` (tokenise, both forward passes, keep every hidden state)
+ ``analyze_text(..., state=state)`` (cosines, prediction, top features of every SAE), which is
what ``python -m core analyze`` computes. The dashboard's explorer does less on a cache miss
(``pages/_cached.py``: the same state, then the features of the one SAE it shows), so this
bounds its cost from above; a second row times that (the last layer's pre-trained SAE, the
explorer's default), interleaved with the other two.

Baseline: the two bare forward passes ``model(input_ids, output_hidden_states=True)`` of both
classifiers on the same token ids. Target: at most 1.15x.

Cache hit: the dashboard caches the analysis with ``st.cache_data`` keyed by (run, stamp, text,
top, rank_by, SAE), where the stamp (``RunFolder.stamp``) is read from the run's files on every
call; a hit computes the stamp, hashes those arguments and unpickles a copy of the stored result.
Timed through a real ``st.cache_data`` wrapper (Streamlit's memory cache outside a server); target 5 ms.
"""

from __future__ import annotations

import logging

import torch

from bench.common import Context, Section, bench_run, median, timeit

D_SAE, K = 1536, 32


def ensure_saes(run) -> None:
    """A TopK SAE on hidden states 1..L of both models (created once, random weights)."""
    from core.models import load_classifier
    from core.sae import SAEConfig, SparseAutoencoder

    if len(run.sae_dirs()) >= 12:
        return
    cfg = load_classifier(str(run.model_dir("finetuned"))).config
    for seed, model in enumerate(("pretrained", "finetuned")):
        for layer in range(1, cfg.num_hidden_layers + 1):
            sae_cfg = SAEConfig(d_in=cfg.hidden_size, d_sae=D_SAE, k=K, hidden_state_index=layer, model=model, hook_name=f"bert.encoder.layer.{layer - 1}", model_path=str(run.model_dir(model).resolve()))
            SparseAutoencoder(sae_cfg, generator=torch.Generator().manual_seed(100 * seed + layer)).save(run.sae_dir(model, layer))


def text_of_length(tokenizer, texts: list[str], n_tokens: int, max_length: int, truncation: str) -> str:
    """A prefix of a real review that encodes to exactly ``n_tokens`` tokens (specials included)."""
    from core.models import encode

    for text in texts:
        words = text.split()
        for i in range(1, len(words) + 1):
            ids = encode(tokenizer, [" ".join(words[:i])], max_length, truncation)[0]
            if len(ids) == n_tokens:
                return " ".join(words[:i])
            if len(ids) > n_tokens:
                break
    raise RuntimeError(f"no review prefix encodes to {n_tokens} tokens")


def run(ctx: Context) -> Section:
    import streamlit as st

    from core.analysis import analyze_text, load_bundle, sentence_state
    from core.data import load_split

    sec = Section("analysis", __doc__.split("\n\n")[0])
    run_ = bench_run(ctx, ctx.pick(21000, 300))
    ensure_saes(run_)
    bundle = load_bundle(run_)
    mc = bundle.config["model"]
    reviews = load_split(run_, "test")["text"].tolist()[:50]
    repeats, warmup = ctx.pick(40, 5), ctx.pick(5, 2)
    details = {"saes": len(bundle.saes), "d_sae": D_SAE, "k": K, "repeats": repeats}

    for n_tokens in (16, 64):
        text = text_of_length(bundle.tokenizer, reviews, n_tokens, mc["max_length"], mc["truncation"])
        state = sentence_state(bundle, text)
        assert len(state.token_ids) == n_tokens
        input_ids = torch.tensor([state.token_ids])

        def per_enter():
            s = sentence_state(bundle, text)
            return analyze_text(bundle, text, state=s)

        shown = [max(bundle.saes, key=lambda key: (key[1], key[0] == "pretrained"))]  # the explorer's default: the last layer's pre-trained SAE

        def per_enter_explorer():
            s = sentence_state(bundle, text)
            return analyze_text(bundle, text, state=s, saes=shown)

        @torch.no_grad()
        def bare():
            for model in bundle.models.values():
                model(input_ids=input_ids, output_hidden_states=True)

        # interleave the two so drifts in machine speed hit both alike
        t_full, t_bare, t_one = [], [], []
        for i in range(warmup + repeats):
            a, b, c = timeit(per_enter, repeats=1, warmup=0), timeit(bare, repeats=1, warmup=0), timeit(per_enter_explorer, repeats=1, warmup=0)
            if i >= warmup:
                t_full.append(a.median)
                t_bare.append(b.median)
                t_one.append(c.median)
        full, base = median(t_full), median(t_bare)
        sec.add(f"per-Enter analysis, {n_tokens} tokens (both models, {len(bundle.saes)} SAEs)", full * 1e3, "ms", base * 1e3, "two bare forward passes", target="ratio <= 1.15")
        sec.add(f"per-Enter analysis as the explorer computes it, {n_tokens} tokens (both models, the one SAE shown)", median(t_one) * 1e3, "ms", base * 1e3, "two bare forward passes")
        # where the time goes: the two halves on their own
        t_state = timeit(lambda: sentence_state(bundle, text), repeats=repeats, warmup=warmup)
        t_analyze = timeit(lambda: analyze_text(bundle, text, state=state), repeats=repeats, warmup=warmup)
        details[f"{n_tokens}_tokens"] = {
            "text": text,
            "per_enter_ms": [t * 1e3 for t in t_full],
            "bare_ms": [t * 1e3 for t in t_bare],
            "per_enter_explorer_ms": [t * 1e3 for t in t_one],
            "explorer_sae": list(shown[0]),
            "sentence_state_median_ms": t_state.median * 1e3,
            "analyze_text_given_state_median_ms": t_analyze.median * 1e3,
            "sae_encoder_mflop": 2 * n_tokens * 384 * D_SAE * len(bundle.saes) / 1e6,
        }

    # cache hit through a real st.cache_data wrapper
    logging.getLogger("streamlit").setLevel(logging.ERROR)
    @st.cache_data(show_spinner=False, max_entries=64)
    def cached_analysis(path: str, stamp: int, text: str, top: int, rank_by: str) -> dict:
        return analyze_text(bundle, text, top=top, rank_by=rank_by, state=sentence_state(bundle, text))

    text = details["64_tokens"]["text"]
    miss = timeit(lambda: cached_analysis(str(run_.root), run_.stamp(), text, 5, "variance"), repeats=1, warmup=0)
    hit = timeit(lambda: cached_analysis(str(run_.root), run_.stamp(), text, 5, "variance"), repeats=ctx.pick(50, 10), warmup=3)
    sec.add("cache hit (the run's stamp + st.cache_data: hash arguments, unpickle the stored analysis), 64 tokens", hit.median * 1e3, "ms", miss.median * 1e3, "cache miss (full analysis)", target="value <= 5")
    details["cache"] = {"hit_ms": [t * 1e3 for t in hit.runs], "miss_ms": miss.median * 1e3}
    sec.details = details
    return sec
