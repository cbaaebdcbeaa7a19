"""The saes and features steps and the per-sentence analysis on the tiny run, against direct computations."""

import collections
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from core.activations import ActivationStore
from core.errors import LayerscopeError
from core.report import build_report
from core.files import write_json
from core.runfolder import MODELS, RunFolder, read_json
from core.sae import SparseAutoencoder
from tests.test_cli import assert_user_error, cli

SAE_KEYS = {"model", "layer", "architecture", "d_sae", "l0", "fvu", "mse", "dead_fraction", "dense_fraction", "accuracy_spliced", "kl_spliced"}


def _encode_numpy(sae: SparseAutoencoder, x: np.ndarray) -> np.ndarray:
    """TopK encoder written out by hand from the saved weights."""
    p = {k: v.detach().double().numpy() for k, v in sae.named_parameters()}
    pre = (x / sae.cfg.normalization_scale - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, : sae.cfg.k]
    rows = np.arange(len(x))[:, None]
    z[rows, top] = np.maximum(pre[rows, top], 0)
    return z


def test_every_sae_is_saved_and_reported(tiny_run):
    rep = build_report(tiny_run)
    assert {(s["model"], s["layer"]) for s in rep["saes"]} == {(m, l) for m in ("pretrained", "finetuned") for l in (1, 2)}
    for s in rep["saes"]:
        assert SAE_KEYS <= set(s)
        assert s["l0"] <= 8 + 1e-9 and 0 <= s["dead_fraction"] <= 1
        assert ("fvu_on_finetuned" in s) == (s["model"] == "pretrained")
        folder = tiny_run.sae_dir(s["model"], s["layer"])
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["d_in"] == 32 and cfg["hook_name"].startswith("bert.encoder.layer.") and cfg["model"] == s["model"]
        assert (folder / "sae_weights.safetensors").is_file()
    for m in rep["matching"]:
        assert m["kept"] + m["shifted"] + m["lost"] == pytest.approx(1.0)
        assert 0 <= m["new"] <= 1


def test_fvu_and_l0_equal_a_direct_computation(tiny_run):
    store = ActivationStore(tiny_run, "test")
    for model, layer, folder in tiny_run.sae_dirs():
        sae = SparseAutoencoder.load(folder)
        x = store.load_layer(model, layer).double().numpy()
        z = _encode_numpy(sae, x)
        p = {k: v.detach().double().numpy() for k, v in sae.named_parameters()}
        x_hat = (z @ p["W_dec"] + p["b_dec"]) * sae.cfg.normalization_scale
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["fvu"] == pytest.approx(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-3)
        assert metrics["l0"] == pytest.approx((z > 0).sum(1).mean(), rel=1e-6)
        assert metrics["dead_fraction"] == pytest.approx(((z > 0).sum(0) == 0).mean())
        # the rare-token split: ids seen fewer than 50 times among the train split's tokens
        train_ids = ActivationStore(tiny_run, "train").all_meta()["token_ids"].numpy()
        seen = collections.Counter(train_ids.tolist())
        rare = np.array([seen[t] < 50 for t in store.all_meta()["token_ids"].tolist()])
        assert 0 < rare.sum() < len(rare)  # the tiny run has both kinds: the check below means something
        err, dev = ((x - x_hat) ** 2).sum(1), ((x - x.mean(0)) ** 2).sum(1)
        r = metrics["rare_tokens"]
        assert r["seen_fewer_than"] == 50 and r["token_share"] == pytest.approx(rare.mean())
        assert r["error_share"] == pytest.approx(err[rare].sum() / err.sum(), rel=1e-3)
        assert r["fvu"] == pytest.approx(err[rare].sum() / dev[rare].sum(), rel=1e-3)
        assert r["fvu_rest"] == pytest.approx(err[~rare].sum() / dev[~rare].sum(), rel=1e-3)


def test_fvu_on_finetuned_equals_a_direct_computation(tiny_run):
    """``fvu_on_finetuned``: each pre-trained SAE's FVU on the fine-tuned model's test tokens of its
    layer (the drift alone), from a hand encode in float64; it differs from its FVU on its own model."""
    store = ActivationStore(tiny_run, "test")
    checked = 0
    for model, layer, folder in tiny_run.sae_dirs():
        if model != "pretrained":
            continue
        sae = SparseAutoencoder.load(folder)
        p = {k: v.detach().double().numpy() for k, v in sae.named_parameters()}
        x = store.load_layer("finetuned", layer).double().numpy()
        x_hat = (_encode_numpy(sae, x) @ p["W_dec"] + p["b_dec"]) * sae.cfg.normalization_scale
        want = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["fvu_on_finetuned"] == pytest.approx(want, rel=1e-3), layer  # fp32 encode in core, float64 here
        assert metrics["fvu_on_finetuned"] != pytest.approx(metrics["fvu"], rel=1e-2)  # another model's tokens: the check is not the plain FVU again
        checked += 1
    assert checked == 2


@pytest.mark.parametrize("sae_model", MODELS)
def test_spliced_accuracy_equals_a_hand_made_hook(tiny_run, sae_model):
    """Both models' SAEs are judged inside the fine-tuned classifier, on its hidden state 1."""
    from transformers import AutoModelForSequenceClassification

    from core.data import load_split
    from core.models import encode, load_tokenizer

    folder = tiny_run.sae_dir(sae_model, 1)
    sae = SparseAutoencoder.load(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_run.model_dir("finetuned"))).eval()
    block = model.bert.encoder.layer[0]  # its output is hidden state 1

    def replace(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        new = sae(h[0])[0][None]
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = block.register_forward_hook(replace)
    cfg = tiny_run.manifest()["config"]["model"]
    test = load_split(tiny_run, "test")
    tok = load_tokenizer(str(tiny_run.model_dir("finetuned")))
    with torch.no_grad():
        preds = [int(model(input_ids=torch.tensor([ids])).logits.argmax()) for ids in encode(tok, test["text"].tolist(), cfg["max_length"], cfg["truncation"])]
    assert metrics["accuracy_spliced"] == pytest.approx(np.mean(np.array(preds) == test["label"].to_numpy()))
    assert metrics["splice_texts"] == len(test)  # the tiny run's test split is smaller than saes.splice_examples
    assert metrics["spliced_into"] == "finetuned"
    handle.remove()
    with torch.no_grad():  # accuracy_original is the fine-tuned classifier's own accuracy on the same texts
        plain = [int(model(input_ids=torch.tensor([ids])).logits.argmax()) for ids in encode(tok, test["text"].tolist(), cfg["max_length"], cfg["truncation"])]
    assert metrics["accuracy_original"] == pytest.approx(np.mean(np.array(plain) == test["label"].to_numpy()))


@pytest.mark.parametrize("cache_bytes", [2 << 30, 0], ids=["resumed", "full passes"])
def test_splice_runner_equals_full_spliced_passes(tiny_run, cache_bytes):
    """Resuming from the kept hidden state gives the probabilities of a full pass with the SAE hooked in."""
    from core.data import load_split
    from core.models import encode, load_classifier, load_tokenizer, predict_proba
    from core.saes import SpliceRunner, splice

    cfg = tiny_run.manifest()["config"]["model"]
    tok = load_tokenizer(str(tiny_run.model_dir("finetuned")))
    ids = encode(tok, load_split(tiny_run, "test")["text"].tolist(), cfg["max_length"], cfg["truncation"])
    model = load_classifier(str(tiny_run.model_dir("finetuned"))).eval()
    layers = sorted(layer for m, layer, _ in tiny_run.sae_dirs() if m == "pretrained")
    runner = SpliceRunner(model, ids, tok.pad_token_id, layers, batch_size=3, cache_bytes=cache_bytes)
    assert bool(runner.layers) == (cache_bytes > 0)
    assert torch.equal(runner.reference, predict_proba(model, ids, tok.pad_token_id, batch_size=3, bf16=True))
    for layer in layers:
        sae = SparseAutoencoder.load(tiny_run.sae_dir("pretrained", layer))
        with splice(model, layer, sae):
            full = predict_proba(model, ids, tok.pad_token_id, batch_size=3, bf16=True)
        spliced = runner.spliced(layer, sae)
        torch.testing.assert_close(spliced, full, rtol=0, atol=1e-6)
        assert not torch.allclose(spliced, runner.reference, atol=1e-4), "the splice must change something"
    assert len(model.bert.encoder.layer) == model.config.num_hidden_layers  # the block list is restored


def _hand_spliced_probabilities(run, texts: list[str]):
    """``probabilities(layer=None, sae=None) -> [texts, C] float64``: the fine-tuned classifier from
    ``transformers`` on ``texts``, one unpadded text at a time under bf16 autocast (as the saes step
    runs it), with hidden state ``layer`` replaced by ``sae``'s reconstruction through a hand-made hook."""
    from transformers import AutoModelForSequenceClassification

    from core.models import encode, load_tokenizer

    cfg = run.manifest()["config"]["model"]
    folder = str(run.model_dir("finetuned"))
    ids = encode(load_tokenizer(folder), texts, cfg["max_length"], cfg["truncation"])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

    def probabilities(layer=None, sae=None) -> np.ndarray:
        def replace(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            new = sae(h[0])[0][None].to(h.dtype)  # the SAE runs under the autocast too, as in the step
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = model.bert.encoder.layer[layer - 1].register_forward_hook(replace) if layer else None  # its output is hidden state `layer`
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return np.stack([torch.softmax(model(input_ids=torch.tensor([x])).logits[0].float(), -1).double().numpy() for x in ids])
        finally:
            if handle is not None:
                handle.remove()

    return probabilities


def test_spliced_kl_equals_a_hand_made_bf16_hook(tiny_run):
    """``kl_spliced`` is the mean over the test texts of KL(p_original || p_spliced) (the direction
    ``fidelity`` documents) of the fine-tuned classifier, both passes under bf16 autocast as the step
    runs them; here from ``transformers`` with a hand-made hook, one unpadded text at a time, the KL
    summed in float64 by scipy. ``accuracy_spliced`` is the argmax of the same spliced probabilities."""
    from scipy.stats import entropy

    from core.data import load_split

    test = load_split(tiny_run, "test")
    probabilities = _hand_spliced_probabilities(tiny_run, test["text"].tolist())
    p_ref = probabilities()
    directed = 0
    for sae_model, layer, sae_folder in tiny_run.sae_dirs():
        metrics = json.loads((sae_folder / "metrics.json").read_text())
        p_spl = probabilities(layer, SparseAutoencoder.load(sae_folder))
        kl = entropy(p_ref, p_spl, axis=1)  # [texts] sum_c p_ref log(p_ref / p_spl)
        # bf16 keeps 8 significant bits: the step's padded batches and these single texts may round a
        # logit differently, so 1% of the KL (up to 3e-2 here; 0 where bf16 rounding hides the splice)
        assert metrics["kl_spliced"] == pytest.approx(kl.mean(), rel=1e-2, abs=1e-7), (sae_model, layer)
        assert metrics["accuracy_spliced"] == pytest.approx((p_spl.argmax(1) == test["label"].to_numpy()).mean()), (sae_model, layer)
        reverse = entropy(p_spl, p_ref, axis=1).mean()
        directed += reverse != pytest.approx(kl.mean(), rel=1e-2, abs=1e-7)
    assert directed > 0, "KL(spliced || original) must differ somewhere, or the direction is not checked"
    assert max(json.loads((f / "metrics.json").read_text())["kl_spliced"] for *_, f in tiny_run.sae_dirs()) > 1e-3  # some splice moves the classifier


def test_change_ranks_features_by_how_far_fine_tuning_moved_them_over_the_test_tokens(tiny_run):
    """The features step's ``change``: mean over the test tokens of |z_ft - z_pre|, each SAE applied to
    both models' hidden states of the same tokens; checked against a hand encode of the shards."""
    import core.features_step as fs

    store = ActivationStore(tiny_run, "test")
    for model, layer, _ in tiny_run.sae_dirs():
        sae = SparseAutoencoder.load(tiny_run.sae_dir(model, layer))
        z = {m: _encode_numpy(sae, store.load_layer(m, layer).double().numpy()) for m in MODELS}  # [tokens, d_sae]
        want = np.abs(z["finetuned"] - z["pretrained"]).mean(0)
        saved = fs.load_stats(tiny_run, model, layer)["change"].double().numpy()
        np.testing.assert_allclose(saved, want, rtol=1e-4, atol=1e-5)
        assert want.max() > 0  # fine-tuning moved something
        order = fs.ranking(tiny_run, model, layer, "change").numpy()
        assert np.all(np.diff(saved[order]) <= 0)  # largest first
        table = fs.feature_table(tiny_run, model, layer, by="change")
        np.testing.assert_allclose(table["change"].to_numpy(), saved[order], rtol=1e-6)
        assert fs.feature_card(tiny_run, model, layer, int(order[0]))["change"] == pytest.approx(float(saved[order[0]]))


def test_change_on_statistics_written_before_it_existed_says_how_to_fix(run_copy):
    """A run whose features step ran before ``change`` was recorded: one clear message, and the
    explorer falls back to the sentence's variance, saying why."""
    from safetensors.torch import load_file, save_file

    import core.features_step as fs
    from core.analysis import analyze_text, load_bundle
    from core.runfolder import RunFolder

    path = run_copy / "features" / "pretrained" / "layer_1" / "stats.safetensors"
    tensors = load_file(str(path))
    del tensors["change"]
    save_file(tensors, str(path))
    run = RunFolder(run_copy)
    with pytest.raises(LayerscopeError, match=r"predate the change ranking; re-run `python -m core features --run .* --force`"):
        fs.ranking(run, "pretrained", 1, "change")
    assert "change" not in fs.feature_table(run, "pretrained", 1).columns and fs.feature_card(run, "pretrained", 1, 0)["change"] is None
    result = analyze_text(load_bundle(run), "the plot", top=2, rank_by="change", clean=False, saes=[("pretrained", 1)])
    assert result["ranking"].startswith("variance over this sentence (no dataset-level change for this SAE: ") and "predate the change ranking" in result["ranking"]



def test_one_missing_statistics_file_relabels_that_sae_only(run_copy):
    """One SAE's statistics file gone: that SAE ranks by the sentence and says why; the others keep
    the dataset ranking and say so (all were labelled "variance over this sentence")."""
    from core.analysis import analyze_text, format_analysis, load_bundle
    from core.runfolder import RunFolder

    (run_copy / "features" / "finetuned" / "layer_1" / "stats.safetensors").unlink()
    result = analyze_text(load_bundle(RunFolder(run_copy)), "the plot was fine", top=2, rank_by="selectivity", clean=False)
    labels = {(e["model"], e["layer"]): e["ranking"] for e in result["saes"]}
    assert labels.pop(("finetuned", 1)).startswith("variance over this sentence (no dataset-level selectivity for this SAE: no feature statistics for finetuned layer 1; re-run `python -m core features")
    assert labels and set(labels.values()) == {"selectivity"}
    assert result["ranking"].startswith("selectivity, or variance over this sentence for an SAE without statistics")
    text = format_analysis(result)
    assert "SAE finetuned layer 1 (top features by variance over this sentence (no dataset-level selectivity for this SAE: no feature statistics" in text
    one = analyze_text(load_bundle(RunFolder(run_copy)), "the plot was fine", top=2, clean=False, saes=[("finetuned", 1)])
    assert one["ranking"].startswith("variance over this sentence (no dataset-level variance for this SAE: no feature statistics for finetuned layer 1")
    assert "SAE pretrained layer 1 (top features by selectivity)" in text


def test_a_matching_file_gone_after_the_step_points_to_features_force(run_copy):
    """`build --until features` would only say "already done": the message names `features --force`."""
    from core.analysis import load_bundle, matched_features, sentence_state
    from core.runfolder import RunFolder

    run = RunFolder(run_copy)
    run.matching_path(1).unlink()
    bundle = load_bundle(run)
    with pytest.raises(LayerscopeError, match=rf"no feature matching for layer 1 \(.*layer_1.json is missing\); re-run `python -m core features --run {run_copy} --force`"):
        matched_features(bundle, sentence_state(bundle, "the plot"), 1, 0)


def test_a_matching_file_from_another_build_is_named_by_the_match_panel(run_copy):
    """Lists shorter than the SAE, or a partner beyond the other SAE: the file and its fix are
    named (the first read as "no feature N", the second failed with an IndexError)."""
    from core.analysis import load_bundle, matched_features, sentence_state

    run = RunFolder(run_copy)
    bundle = load_bundle(run)
    state = sentence_state(bundle, "the plot")
    path = run.matching_path(1)
    match = read_json(path)
    d_sae = bundle.saes[("pretrained", 1)].cfg.d_sae
    short = {**match, "partner_of_pretrained": match["partner_of_pretrained"][:3]}
    write_json(path, short)
    with pytest.raises(LayerscopeError, match=rf"lists 3 pretrained features under 'partner_of_pretrained', but the SAE has {d_sae}; .* re-run `python -m core features --run {run_copy} --force`"):
        matched_features(bundle, state, 1, 0)
    beyond = {**match, "partner_of_pretrained": [d_sae + 7] * d_sae}
    write_json(path, beyond)
    with pytest.raises(LayerscopeError, match=rf"pairs feature 0 with feature {d_sae + 7} of the fine-tuned SAE, which has {bundle.saes[('finetuned', 1)].cfg.d_sae}"):
        matched_features(bundle, state, 1, 0)


def test_statistics_of_saes_retrained_since_are_not_used(run_copy):
    """``saes --force --layers 1`` retrains layer 1 and marks the features step not done; the old
    statistics files stay on disk but describe the old SAEs, so nothing ranks by them (analyze
    ranked the new SAE by the old one's variance) and the feature browser asks for the step."""
    from core.analysis import analyze_text, load_bundle
    from core.config import load_config
    from core.pipeline import run_step
    from core.runfolder import RunFolder
    import core.features_step as fs

    run = RunFolder(run_copy)
    cfg = load_config(base=run.manifest()["config"], overrides={"saes.layers": [1], "saes.training.seed": 5})
    run_step(run, "saes", cfg, force=True, redo=True, log=lambda *_: None)
    assert not run.is_done("features") and run.feature_stats_path("pretrained", 1).is_file()
    result = analyze_text(load_bundle(run), "the plot was fine", top=2, clean=False)
    assert result["ranking"] == "variance over this sentence" and {e["ranking"] for e in result["saes"]} == {"variance over this sentence"}
    with pytest.raises(LayerscopeError, match="needs step 'features', which has not run"):
        fs.feature_table(run, "pretrained", 1)


@pytest.mark.parametrize("damage", ["truncated", "field missing", "wrong shape"])
def test_damaged_feature_statistics_give_one_message_naming_the_fix(run_copy, damage):
    """A statistics file cut short, lacking a field, or with a field of the wrong shape: one
    message naming the file and the command that rewrites it (not a deserialising error or a
    pandas length mismatch), from ``analyze`` too, which ranks by the sentence only when asked."""
    from safetensors.torch import load_file, save_file

    import core.features_step as fs
    from core.analysis import analyze_text, load_bundle
    from core.errors import StatsUnreadable
    from core.runfolder import RunFolder

    path = run_copy / "features" / "pretrained" / "layer_1" / "stats.safetensors"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
        expected = "is truncated or not a safetensors file"
    else:
        tensors = load_file(str(path))
        if damage == "field missing":
            del tensors["hist_counts"]
            expected = "lacks hist_counts"
        else:
            tensors["mean_per_class"] = tensors["mean_per_class"][:, :1].contiguous()  # one class, the run has two
            m = len(tensors["mean"])
            expected = f"mean_per_class has shape ({m}, 1), not ({m}, 2)"
        save_file(tensors, str(path))
    run = RunFolder(run_copy)
    bundle = load_bundle(run)
    calls = (lambda: fs.ranking(run, "pretrained", 1), lambda: fs.feature_table(run, "pretrained", 1), lambda: analyze_text(bundle, "the plot", top=2, clean=False, saes=[("pretrained", 1)]))
    for call in calls:
        with pytest.raises(StatsUnreadable) as e:
            call()
        assert str(path) in str(e.value) and expected in str(e.value) and str(e.value).endswith(f"re-run `python -m core features --run {run_copy} --force`")
    result = analyze_text(bundle, "the plot", top=2, rank_by="sentence", clean=False, saes=[("pretrained", 1)])
    assert result["ranking"] == "variance over this sentence" and len(result["saes"][0]["features"]) == 2
    fs.load_stats(run, "finetuned", 1)  # the other files still load

def test_the_dashboard_bundle_leaves_out_a_damaged_sae_and_keeps_the_rest(run_copy):
    """``analyze`` refuses a run with a damaged SAE file; the dashboard's lenient bundle leaves that
    SAE out with the same message and analyses the sentence with the others, which give the
    numbers the strict bundle gives on the undamaged run."""
    from core.analysis import analyze_text, load_bundle
    from core.runfolder import RunFolder

    run = RunFolder(run_copy)
    good = analyze_text(load_bundle(run), "the plot was fine", top=2, clean=False)
    weights = run.sae_dir("finetuned", 1) / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(LayerscopeError, match="truncated") as strict:
        load_bundle(run)
    bundle = load_bundle(run, lenient=True)
    assert list(bundle.sae_problems) == [("finetuned", 1)] and bundle.sae_problems[("finetuned", 1)] == str(strict.value)
    assert str(weights) in bundle.sae_problems[("finetuned", 1)]
    assert ("finetuned", 1) not in bundle.saes and set(bundle.saes) == {(m, l) for m, l, _ in run.sae_dirs()} - {("finetuned", 1)}
    result = analyze_text(bundle, "the plot was fine", top=2, clean=False)
    assert [(e["model"], e["layer"]) for e in result["saes"]] == [(e["model"], e["layer"]) for e in good["saes"] if (e["model"], e["layer"]) != ("finetuned", 1)]
    kept = {(e["model"], e["layer"]): e["features"] for e in good["saes"]}
    for entry in result["saes"]:
        assert entry["features"] == kept[(entry["model"], entry["layer"])]
    assert result["cosine"] == good["cosine"] and result["prediction"] == good["prediction"]


def test_the_dashboard_bundle_names_the_classes_from_the_model_when_labels_json_is_damaged(run_copy):
    from core.analysis import analyze_text, load_bundle
    from core.runfolder import RunFolder

    run = RunFolder(run_copy)
    names = run.labels()
    run.labels_path.write_text('{"names": ["only one"]}')
    with pytest.raises(LayerscopeError, match="names 1 classes but the fine-tuned model has 2"):
        load_bundle(run)
    bundle = load_bundle(run, lenient=True)
    assert "names 1 classes but the fine-tuned model has 2" in bundle.labels_problem and not bundle.sae_problems
    # the fine-tuned model's config keeps the class names it was trained with
    assert bundle.labels == names
    assert list(analyze_text(bundle, "the plot", top=1, clean=False)["prediction"]["probabilities"]) == names
    # the statistics files hold two classes: labels.json is named as the cause, not each of them
    import core.features_step as fs

    with pytest.raises(LayerscopeError, match=r"labels.json names 1 classes but the fine-tuned model has 2; .* rebuild the run") as e:
        fs.feature_table(run, "pretrained", 1)
    assert "stats.safetensors" not in str(e.value)


def test_a_damaged_matching_file_costs_the_feature_browser_only_its_match_columns(run_copy):
    """``feature_table`` / ``feature_card`` raise on a matching file that is damaged or from another
    build (its lists do not fit the SAE); ``lenient`` (the dashboard) leaves the match out and says why."""
    import core.features_step as fs
    from core.runfolder import RunFolder

    run = RunFolder(run_copy)
    good, good_card = fs.feature_table(run, "pretrained", 1), fs.feature_card(run, "pretrained", 1, 0)
    assert {"status", "match_similarity"} <= set(good.columns) and "matching_problem" not in good.attrs
    assert good_card["match"] is not None and good_card["match_problem"] is None
    path = run.matching_path(1)
    match = read_json(path)
    cases = {"not json": ("{", "is not valid JSON"), "short": (None, f"lists 3 pretrained features under 'partner_of_pretrained', but the SAE has {len(good)}")}
    for damage, (text, expected) in cases.items():
        if text is None:
            match["partner_of_pretrained"] = match["partner_of_pretrained"][:3]
            write_json(path, match)
        else:
            path.write_text(text)
        for call in (lambda: fs.feature_table(run, "pretrained", 1), lambda: fs.feature_card(run, "pretrained", 1, 0)):
            with pytest.raises(LayerscopeError, match=re.escape(expected)):
                call()
        table = fs.feature_table(run, "pretrained", 1, lenient=True)
        assert expected in table.attrs["matching_problem"] and str(path) in table.attrs["matching_problem"], damage
        assert not {"status", "match_similarity", "partner_in_finetuned"} & set(table.columns)
        pd.testing.assert_frame_equal(table, good[table.columns])  # every other column as before
        card = fs.feature_card(run, "pretrained", 1, 0, lenient=True)
        assert card["match"] is None and expected in card["match_problem"]
        assert {k: v for k, v in card.items() if not k.startswith("match")} == {k: v for k, v in good_card.items() if not k.startswith("match")}


def test_feature_statistics_equal_a_direct_computation(tiny_run):
    """The features step's per-latent mean and variance (population) over the test tokens, density
    (share of tokens > 0), mean activation per class (over the tokens of that class's texts) and
    selectivity (scikit-learn's AUROC of each text's max activation, class vs rest), against a hand
    encode of the test tokens, labelled through the activation index's example ids."""
    from sklearn.metrics import roc_auc_score

    import core.features_step as fs
    from core.data import load_split

    store = ActivationStore(tiny_run, "test")
    test = load_split(tiny_run, "test")
    label_of = dict(zip(test["id"].tolist(), test["label"].tolist()))
    example = store.all_meta()["example_ids"].numpy()  # [tokens]
    texts = np.unique(example)
    assert len(texts) == len(test)  # every test text was extracted (activations.eval_examples=0)
    y_tok, y_text = (np.array([label_of[int(e)] for e in ids]) for ids in (example, texts))
    C = len(tiny_run.labels())
    for model, layer, folder in tiny_run.sae_dirs():
        z = _encode_numpy(SparseAutoencoder.load(folder), store.load_layer(model, layer).double().numpy())  # [tokens, d_sae]
        s = {k: v.double().numpy() for k, v in fs.load_stats(tiny_run, model, layer).items()}
        # stored as float32 (relative 6e-8) from core's float32 encode: 1e-5 relative
        np.testing.assert_allclose(s["mean"], z.mean(0), rtol=1e-5, atol=1e-7, err_msg=f"{model} {layer} mean")
        np.testing.assert_allclose(s["variance"], z.var(0), rtol=1e-5, atol=1e-7, err_msg=f"{model} {layer} variance")
        np.testing.assert_allclose(s["density"], (z > 0).mean(0), rtol=1e-6, atol=0, err_msg=f"{model} {layer} density")
        np.testing.assert_array_equal(s["class_token_counts"], np.bincount(y_tok, minlength=C))
        per_class = np.stack([z[y_tok == c].mean(0) for c in range(C)], 1)  # [d_sae, C]
        assert np.abs(per_class[:, :1] - per_class).max() > 1e-3  # the classes differ somewhere: a mix-up would show
        np.testing.assert_allclose(s["mean_per_class"], per_class, rtol=1e-5, atol=1e-7, err_msg=f"{model} {layer} mean per class")
        # selectivity: scikit-learn's AUROC of each text's maximum (core keeps the maxima in float32;
        # the two AUROC formulas differ only in summation order, ~1e-8)
        maxima = np.stack([z[example == e].max(0) for e in texts])  # [texts, d_sae]
        for c in range(C):
            exact = np.array([roc_auc_score(y_text == c, maxima[:, f]) for f in range(z.shape[1])])
            np.testing.assert_allclose(s["selectivity_auroc"][:, c], exact, rtol=0, atol=1e-6, err_msg=f"{model} {layer} AUROC of class {c}")


def test_feature_statistics_do_not_depend_on_the_chunk_size(tiny_run, monkeypatch):
    """Encoding the test tokens a few rows at a time (across shard boundaries) gives the same statistics."""
    import core.features_step as fs
    from core.data import load_split

    store = ActivationStore(tiny_run, "test")
    test = load_split(tiny_run, "test")
    labels = dict(zip(test["id"].tolist(), test["label"].tolist()))
    sae = SparseAutoencoder.load(tiny_run.sae_dir("finetuned", 1))
    results = []
    for rows in (10**9, 5):
        monkeypatch.setattr(fs, "EVAL_CHUNK_ROWS", rows)
        stats, _, change = fs.feature_stats(sae, store, "finetuned", 1, labels, 2, top_k=4)
        results.append((stats, fs.context_windows(sae, store, "finetuned", 1, stats.top_token_index, 3), change))
    (a, ctx_a, change_a), (b, ctx_b, change_b) = results
    torch.testing.assert_close(change_b, change_a, rtol=1e-5, atol=1e-6)
    assert store.num_tokens > 5 * 3
    for name in fs.STAT_FIELDS:
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-6, msg=name)  # fp32 matmuls block rows differently
    assert torch.equal(ctx_a[0], ctx_b[0])
    torch.testing.assert_close(ctx_b[1], ctx_a[1], rtol=1e-3, atol=1e-3)  # activations are stored as fp16


def _assert_close_json(a, b, where, rel=1e-6):
    """Nested JSON values equal, floats to ``rel``."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close_json(a[k], b[k], (*where, k), rel)
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close_json(x, y, (*where, i), rel)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-12), where
    else:
        assert a == b, where


def test_seed_baseline_matching_leaves_out_dead_latents_like_the_main_matching(tiny_run):
    """Both matchings of a layer count shares of live latents (fired on a test token), so the
    seed baseline sits beside the pre-trained vs fine-tuned fractions on the same footing."""
    from core.features import match_features
    from core.features_step import seed_twin

    store = ActivationStore(tiny_run, "test")
    cfg = json.loads(tiny_run.manifest_path.read_text())["config"]["features"]
    dead_seen = 0
    for layer in tiny_run.manifest()["steps"]["saes"]["result"]["layers"]:
        x = store.load_layer("pretrained", layer).double().numpy()
        pre, twin = SparseAutoencoder.load(tiny_run.sae_dir("pretrained", layer)), seed_twin(tiny_run, layer)
        alive = [torch.from_numpy((_encode_numpy(s, x) > 0).any(0)) for s in (pre, twin)]  # by hand, not the stats file
        dead_seen += int((~alive[0]).sum() + (~alive[1]).sum())
        base = match_features(pre.W_dec.detach(), twin.W_dec.detach(), kept_threshold=cfg["kept_threshold"], shifted_threshold=cfg["shifted_threshold"], alive_a=alive[0], alive_b=alive[1])
        saved = json.loads(tiny_run.matching_path(layer).read_text())
        for k in ("kept", "shifted", "new", "lost"):
            assert saved[f"baseline_{k}"] == pytest.approx(getattr(base, k)), (layer, k)
    assert dead_seen > 0  # the tiny SAEs have dead latents, so counting them would change the fractions


def test_seed_twin_has_the_shape_of_its_sae_when_layers_were_trained_with_other_settings(run_copy):
    """README's frontier recipe retrains one layer with another k; the other layers keep their
    SAEs, and the seed twin of each must be of that SAE's kind, not of the latest settings."""
    from core.features_step import seed_twin
    from core.runfolder import RunFolder

    cli("saes", "--run", run_copy, "--layers", "2", "--set", "saes.k=4", "--force", check=True)
    run = RunFolder(run_copy)
    for layer, k in ((1, 8), (2, 4)):
        assert SparseAutoencoder.load(run.sae_dir("pretrained", layer)).cfg.k == k
        twin = seed_twin(run, layer).cfg
        assert (twin.k, twin.d_sae, twin.architecture) == (k, 4 * 32, "topk"), layer


def test_side_by_side_saes_and_features_equal_one_after_another(tiny_run, run_copy):
    """The tiny run was built with saes.workers = features.workers = 2 (the default); one worker
    gives the same SAEs, metrics, feature statistics and matching, and keeps the step hashes."""
    from safetensors.torch import load_file

    from core.runfolder import RunFolder

    manifest = json.loads((run_copy / "manifest.json").read_text())
    assert manifest["config"]["saes"]["workers"] == 2 == manifest["config"]["features"]["workers"]
    cli("saes", "--run", run_copy, "--set", "saes.workers=1", "--force", check=True)
    cli("features", "--run", run_copy, "--set", "features.workers=1", "--force", check=True)
    copy = RunFolder(run_copy)
    for model, layer, folder in tiny_run.sae_dirs():
        a, b = SparseAutoencoder.load(folder), SparseAutoencoder.load(copy.sae_dir(model, layer))
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())), (model, layer)
        ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (folder, copy.sae_dir(model, layer)))
        for m in (ma, mb):
            m["training"].pop("tokens_per_second")
        _assert_close_json(mb, ma, (model, layer))  # one thread may sum in another order: last-digit differences
        sa, sb = (load_file(str(r.features_dir(model, layer) / "stats.safetensors")) for r in (tiny_run, copy))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (model, layer)
    for layer in tiny_run.manifest()["steps"]["saes"]["result"]["layers"]:
        assert tiny_run.matching_path(layer).read_text() == copy.matching_path(layer).read_text()
    steps = json.loads((run_copy / "manifest.json").read_text())["steps"]
    assert steps["saes"]["config_hash"] == manifest["steps"]["saes"]["config_hash"]  # workers is not a setting of the results


def test_side_by_side_jobs_leave_the_shared_classifier_to_the_splice_lock(run_copy, monkeypatch):
    """A splice cuts the classifier's block list while it runs, so SAE jobs must not read the
    model outside ``SpliceRunner.spliced``: module paths are looked up before the jobs start."""
    import threading

    import core.saes as saes_mod
    from core.config import load_config
    from core.runfolder import RunFolder
    from core.threads import torch_threads

    lookup = saes_mod.hidden_state_module

    def main_thread_only(model, index):
        assert threading.current_thread() is threading.main_thread(), "a job read the shared classifier"
        return lookup(model, index)

    monkeypatch.setattr(saes_mod, "hidden_state_module", main_thread_only)
    run = RunFolder(run_copy)
    cfg = load_config(base=run.manifest()["config"])
    with torch_threads(2):  # two workers need two threads
        out = saes_mod.run_saes(run, cfg.saes, cfg.model, progress=False, resume=False)
    assert len(out["saes"]) == 2 * len(out["layers"]) >= 4  # every job ran, at least two side by side


def test_a_build_after_new_activations_retrains_every_sae(tiny_run, run_copy):
    """``build`` resumes the saes step SAE by SAE, keeping those trained with the same settings;
    after the activations were extracted again (here from half the train texts), every SAE must
    be trained on the new ones, not kept from the old."""
    from core.runfolder import RunFolder

    copy = RunFolder(run_copy)
    n_train = copy.manifest()["steps"]["activations"]["result"]["train"]["examples"]
    cli("activations", "--run", run_copy, "--set", f"activations.sae_examples={n_train // 2}", "--force", check=True)
    cli("build", "--run", run_copy, check=True)
    assert copy.manifest()["steps"]["activations"]["result"]["train"]["examples"] == n_train // 2
    for model, layer, folder in tiny_run.sae_dirs():
        old, new = (json.loads((f / "metrics.json").read_text()) for f in (folder, copy.sae_dir(model, layer)))
        assert new["settings_hash"] != old["settings_hash"], (model, layer)
        a, b = SparseAutoencoder.load(folder), SparseAutoencoder.load(copy.sae_dir(model, layer))
        assert not torch.equal(a.W_dec, b.W_dec), (model, layer)



def test_resuming_retrains_an_sae_left_damaged_and_keeps_the_others(tiny_run, run_copy):
    """A saes step interrupted (here: marked not done) with one SAE's weights cut short: resuming
    trains that SAE again instead of recording the damaged file as done; the others are kept."""
    from core.runfolder import RunFolder

    copy = RunFolder(run_copy)
    manifest = json.loads(copy.manifest_path.read_text())
    for step in ("saes", "features"):
        manifest["steps"].pop(step)
    copy.manifest_path.write_text(json.dumps(manifest))
    (model, layer, damaged), *others = copy.sae_dirs()
    weights = damaged / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    kept = {f: (f / "sae_weights.safetensors").stat().st_mtime_ns for _, _, f in others}
    cli("saes", "--run", run_copy, check=True)
    assert copy.is_done("saes")
    retrained = SparseAutoencoder.load(damaged)
    assert torch.equal(retrained.W_dec, SparseAutoencoder.load(tiny_run.sae_dir(model, layer)).W_dec)  # seeded: the same SAE again
    assert {f: (f / "sae_weights.safetensors").stat().st_mtime_ns for f in kept} == kept

def direct_hidden_states(run, ids: list[int]) -> dict[str, list[np.ndarray]]:
    """Both models' hidden states of one sentence, ``{model: [hidden state i: [T, d] float64]}``,
    straight from ``transformers`` (the independent side of the analysis tests)."""
    from transformers import AutoModel

    out = {}
    for m in MODELS:
        with torch.no_grad():
            hidden = AutoModel.from_pretrained(str(run.model_dir(m)))(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        out[m] = [h[0].double().numpy() for h in hidden]
    return out


def ranked_on_sentence(run, rank_by: str):
    """One sentence analysed with a per-sentence ranking (top 4), beside its direct hidden states:
    (bundle, text, state, result, hidden)."""
    from core.analysis import analyze_text, load_bundle, sentence_state

    bundle = load_bundle(run)
    text = "the plot was brilliant but the acting was dull"
    state = sentence_state(bundle, text, clean=False)
    result = analyze_text(bundle, text, top=4, rank_by=rank_by, clean=False, state=state)
    return bundle, text, state, result, direct_hidden_states(run, list(state.token_ids))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sentence_state_runs_both_models_alike_on_any_thread_count_and_keeps_the_count(tiny_run, threads):
    """One torch thread per model or fewer: the two forwards side by side in pool threads, one torch
    thread each; more: one after the other here. Same hidden states either way (from transformers
    directly), and this thread's count and the count new threads start with stay as they were."""
    import threading

    from core import analysis
    from core.analysis import load_bundle, sentence_state
    from core.threads import torch_threads

    bundle = load_bundle(tiny_run)
    analysis._forward_pool().shutdown()
    analysis._forward_pool.cache_clear()  # pool threads started below, on this count (they keep the count they set)
    with torch_threads(threads):
        state = sentence_state(bundle, "the plot was brilliant", clean=False)
        here = torch.get_num_threads()
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
    assert here == threads and seen == [threads]
    hidden = direct_hidden_states(tiny_run, list(state.token_ids))
    for m in MODELS:
        assert state.hidden[m].shape[0] == len(hidden[m])
        for layer, h in enumerate(hidden[m]):
            np.testing.assert_allclose(state.hidden[m][layer].numpy(), h, atol=1e-5)


def test_analyze_equals_direct_computation(tiny_run):
    from core.analysis import analyze_text, load_bundle

    bundle = load_bundle(tiny_run)
    result = analyze_text(bundle, "the plot was brilliant", top=3, clean=False)
    tok = bundle.tokenizer
    ids = tok("the plot was brilliant")["input_ids"]
    assert result["tokens"] == tok.convert_ids_to_tokens(ids) and result["tokens"][0] == "[CLS]"
    hidden = direct_hidden_states(tiny_run, ids)
    for layer, row in enumerate(result["cosine"]):
        a, b = hidden["pretrained"][layer], hidden["finetuned"][layer]
        direct = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        np.testing.assert_allclose(row, direct, atol=1e-5)
    for entry in result["saes"]:
        sae = bundle.saes[(entry["model"], entry["layer"])]
        z = _encode_numpy(sae, hidden[entry["model"]][entry["layer"]])
        assert len(entry["features"]) == 3
        for f in entry["features"]:
            np.testing.assert_allclose(f["activations"], z[:, f["feature"]], atol=1e-4)
    # the prediction: softmax of the fine-tuned classifier's logits (sentence_state runs it in fp32, no
    # autocast), from transformers and named through the saved config's id2label
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(str(tiny_run.model_dir("finetuned"))).eval()
    with torch.no_grad():
        logits = classifier(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    soft = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    want = {classifier.config.id2label[c]: soft[c] for c in range(len(soft))}
    probs = result["prediction"]["probabilities"]
    assert list(probs) == tiny_run.labels() and set(want) == set(probs)
    for name, p in want.items():
        assert probs[name] == pytest.approx(p, abs=1e-6), name
    assert result["prediction"]["label"] == max(want, key=want.get) and min(want.values()) > 1e-3  # not saturated: the values mean something


def test_rank_by_sentence_orders_features_by_their_variance_over_the_sentence(tiny_run):
    """``--rank-by sentence``: each SAE's top features are those with the largest variance over this
    sentence's tokens, from a hand encode; the batched all-SAE path and the one-SAE path agree."""
    from core.analysis import analyze_text

    bundle, text, state, result, hidden = ranked_on_sentence(tiny_run, "sentence")
    assert result["ranking"] == "variance over this sentence"
    for entry in result["saes"]:
        key = (entry["model"], entry["layer"])
        z = _encode_numpy(bundle.saes[key], hidden[key[0]][key[1]])  # [T, d_sae]
        var = z.var(0, ddof=1)
        got = [f["feature"] for f in entry["features"]]
        np.testing.assert_allclose(var[got], np.sort(var)[::-1][:4], rtol=1e-4, atol=1e-9)  # the 4 largest, in order
        for f in entry["features"]:
            np.testing.assert_allclose(f["activations"], z[:, f["feature"]], atol=1e-4)
        (one,) = analyze_text(bundle, text, top=4, rank_by="sentence", state=state, saes=[key])["saes"]
        assert [f["feature"] for f in one["features"]] == got
    by_variance = analyze_text(bundle, text, top=4, rank_by="variance", clean=False, state=state)
    assert by_variance["ranking"] == "variance"  # the dataset-level ranking of the features step
    assert [e["features"] for e in by_variance["saes"]] != [e["features"] for e in result["saes"]]


def test_rank_by_sentence_change_orders_features_by_how_much_fine_tuning_moved_them(tiny_run):
    """``--rank-by sentence-change``: each SAE applied to both models' hidden states; its top features are
    those with the largest |z_ft - z_pre| summed over the sentence's tokens, from a hand encode."""
    from core.analysis import analyze_text

    bundle, text, state, result, hidden = ranked_on_sentence(tiny_run, "sentence-change")
    assert result["ranking"] == "|fine-tuned − pre-trained| over this sentence"
    assert len(result["saes"]) == len(bundle.saes) >= 4
    for entry in result["saes"]:
        sae = bundle.saes[(entry["model"], entry["layer"])]
        z = {m: _encode_numpy(sae, hidden[m][entry["layer"]]) for m in MODELS}  # [T, d_sae] each
        change = np.abs(z["finetuned"] - z["pretrained"]).sum(0)
        got = [f["feature"] for f in entry["features"]]
        np.testing.assert_allclose(change[got], np.sort(change)[::-1][:4], rtol=1e-4, atol=1e-6)  # the 4 largest, in order
        assert change[got[0]] > 0
        for f in entry["features"]:  # activations shown on the SAE's own model
            np.testing.assert_allclose(f["activations"], z[entry["model"]][:, f["feature"]], atol=1e-4)
    sentence = analyze_text(bundle, text, top=4, rank_by="sentence", clean=False, state=state)
    assert [e["features"] for e in sentence["saes"]] != [e["features"] for e in result["saes"]]


@pytest.mark.parametrize("rank_by", ["sentence", "sentence-change"])
def test_compared_sentences_are_ranked_on_their_tokens_together(tiny_run, rank_by):
    """Two sentences compared under a per-sentence ranking: both analyses list the same features,
    the top ones over the two sentences' tokens together (variance over the concatenated tokens,
    or |z_ft - z_pre| summed over both), from a hand encode; each keeps its own activations."""
    from core.analysis import JOINT_LABELS, analyze_text, load_bundle, sentence_state

    bundle = load_bundle(tiny_run)
    texts = ["the plot was brilliant but the acting was dull", "a dull boring film"]
    states = [sentence_state(bundle, t, clean=False) for t in texts]
    hidden = [direct_hidden_states(tiny_run, list(s.token_ids)) for s in states]
    results = [analyze_text(bundle, t, top=4, rank_by=rank_by, clean=False, state=s, compared=states) for t, s in zip(texts, states)]
    alone = [analyze_text(bundle, t, top=4, rank_by=rank_by, clean=False, state=s) for t, s in zip(texts, states)]
    assert all(r["ranking"] == JOINT_LABELS[rank_by] for r in results)
    differ = 0
    for i, key in enumerate(bundle.saes):
        sae = bundle.saes[key]
        z = [{m: _encode_numpy(sae, h[m][key[1]]) for m in MODELS} for h in hidden]  # per sentence: [T_i, d_sae] per model
        if rank_by == "sentence":
            score = np.concatenate([zs[key[0]] for zs in z]).var(0, ddof=1)
        else:
            score = sum(np.abs(zs["finetuned"] - zs["pretrained"]).sum(0) for zs in z)
        entries = [next(e for e in r["saes"] if (e["model"], e["layer"]) == key) for r in results]
        got = [[f["feature"] for f in e["features"]] for e in entries]
        assert got[0] == got[1], key
        np.testing.assert_allclose(score[got[0]], np.sort(score)[::-1][:4], rtol=1e-4, atol=1e-9)  # the 4 largest, in order
        for zs, e in zip(z, entries):
            for f in e["features"]:
                np.testing.assert_allclose(f["activations"], zs[key[0]][:, f["feature"]], atol=1e-4)
        own = [[f["feature"] for f in next(e for e in r["saes"] if (e["model"], e["layer"]) == key)["features"]] for r in alone]
        differ += own[0] != own[1]
    assert differ  # alone, the two sentences list different features somewhere: the joint ranking is what makes them one list
    one = analyze_text(bundle, texts[0], top=4, rank_by=rank_by, clean=False, state=states[0], compared=states[:1])
    assert one["saes"] == alone[0]["saes"] and one["ranking"] == alone[0]["ranking"]  # one sentence: its own ranking
    dataset = analyze_text(bundle, texts[0], top=4, rank_by="variance", clean=False, state=states[0], compared=states)
    assert dataset == analyze_text(bundle, texts[0], top=4, rank_by="variance", clean=False, state=states[0])  # dataset rankings are one list already


def test_unknown_ranking_is_refused(tiny_run):
    from core.analysis import analyze_text, load_bundle

    with pytest.raises(LayerscopeError, match="unknown ranking 'loudest'; use one of variance, selectivity, density, change, sentence, sentence-change"):
        analyze_text(load_bundle(tiny_run), "the plot", rank_by="loudest")


def test_rankings_offered_by_the_cli_and_the_explorer_are_core_s():
    """The CLI and the dashboard spell the rankings out (importing core.analysis would load
    transformers at start-up); they must stay the ones core accepts."""
    from core import analysis
    from core.__main__ import _parser
    from pages import _shared

    sub = next(a for a in _parser()._actions if a.dest == "verb").choices["analyze"]
    (rank,) = [a for a in sub._actions if a.dest == "rank_by"]
    assert tuple(rank.choices) == analysis.RANKINGS == _shared.EXPLORER_RANKINGS
    assert _shared.RANKINGS == analysis.DATASET_RANKINGS


def test_analyze_one_sae_equals_its_entry_of_the_full_analysis(tiny_run):
    """The dashboard asks for the chosen SAE only: same features and values as the batched all-SAE path."""
    from core.analysis import analyze_text, load_bundle, sentence_state

    bundle = load_bundle(tiny_run)
    state = sentence_state(bundle, "the plot was brilliant", clean=False)
    assert not any(h.requires_grad for h in state.hidden.values())  # forward passes ran without autograd
    full = analyze_text(bundle, state.text, top=4, state=state)
    for key in bundle.saes:
        (entry,) = analyze_text(bundle, state.text, top=4, state=state, saes=[key])["saes"]
        (expected,) = [e for e in full["saes"] if (e["model"], e["layer"]) == key]
        assert [f["feature"] for f in entry["features"]] == [f["feature"] for f in expected["features"]]
        for a, b in zip(entry["features"], expected["features"]):
            np.testing.assert_allclose(a["activations"], b["activations"], atol=1e-5)
    assert analyze_text(bundle, state.text, state=state, saes=[])["saes"] == []
    with pytest.raises(LayerscopeError, match="no SAE"):
        analyze_text(bundle, state.text, state=state, saes=[("pretrained", 99)])


@pytest.mark.parametrize("truncation", ["head_tail", "head"])
def test_analyze_says_what_a_long_text_lost(tiny_run, truncation):
    """A text over the run's max_length: the tokens shown are its first and last ones, exactly as
    ``truncation`` says (checked against the untruncated tokenisation), and the note says so."""
    from core.analysis import analyze_text, format_analysis, load_bundle

    bundle = load_bundle(tiny_run)
    max_length = bundle.config["model"]["max_length"]
    bundle.config = {**bundle.config, "model": {**bundle.config["model"], "truncation": truncation}}
    assert analyze_text(bundle, "the plot was brilliant", top=1, clean=False)["truncation"] is None
    text = " ".join(f"word{i} the plot was brilliant" for i in range(20))
    result = analyze_text(bundle, text, top=1, clean=False)
    cut = result["truncation"]
    full = bundle.tokenizer.convert_ids_to_tokens(bundle.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert cut["text_tokens"] == len(full) > max_length and len(result["tokens"]) == max_length
    head, tail = cut["kept_head"], cut["kept_tail"]
    assert head + tail == max_length - 2 and head > 0 and (tail > 0) == (truncation == "head_tail")
    assert result["tokens"][1 : 1 + head] == full[:head] and result["tokens"][1 + head : -1] == full[len(full) - tail :]
    assert cut["cut_after"] == head  # index of the last head token ([CLS] is 0)
    left_out = len(full) - head - tail
    assert f"the text has {len(full)} tokens" in format_analysis(result)
    assert (f"{left_out} in between left out" if tail else f"the last {left_out} left out") in format_analysis(result)


def test_analyze_says_what_the_models_could_not_read(tiny_run):
    """The run's cleaning, as the training texts had it, is reported; a text it empties, or one
    that is mostly [UNK], gets a note (the dashboard shows the same notes)."""
    from core.analysis import analyze_text, format_analysis, load_bundle, reading_notes

    bundle = load_bundle(tiny_run)
    r = analyze_text(bundle, "The acting was BRILLIANT!", top=1)
    assert (r["cleaning"], r["text"], r["unknown_tokens"], reading_notes(r)) == ("cleaned", "the acting was brilliant", 0, [])
    assert analyze_text(bundle, "the acting was brilliant", top=1)["cleaning"] == "unchanged"
    assert analyze_text(bundle, "The acting!", top=1, clean=False)["cleaning"] == "off"
    r = analyze_text(bundle, "😍😍😍 🎬", top=1)
    unknown = r["tokens"].count(bundle.tokenizer.unk_token)
    assert (r["cleaning"], r["text"], r["unknown_tokens"]) == ("emptied", "😍😍😍 🎬", unknown) and unknown >= 1
    notes = reading_notes(r)
    assert len(notes) == 2 and "leaves nothing of this text" in notes[0] and (("both its tokens are" if unknown == 2 else f"all {unknown} of its tokens are") + " unknown") in notes[1]
    assert all(f"note: {n}" in format_analysis(r) for n in notes)
    r = analyze_text(bundle, "the acting was brilliant 🎬", top=1, clean=False)  # one [UNK] among five words: no note
    assert r["unknown_tokens"] == 1 and reading_notes(r) == []


def test_analyze_json_from_cli(tiny_run):
    out = json.loads(cli("analyze", "--run", tiny_run.root, "--text", "the acting was terrible", "--json", "--top", "2", check=True).stdout)
    assert {"tokens", "cosine", "saes", "prediction"} <= set(out)
    assert len(out["cosine"]) == 3 and all(len(c) == len(out["tokens"]) for c in out["cosine"])


def test_feature_card_and_table(tiny_run):
    from core.features_step import feature_card, feature_table, load_stats

    table = feature_table(tiny_run, "finetuned", 2)
    assert list(table["variance"]) == sorted(table["variance"], reverse=True)
    assert {"density", "selectivity", "status", "match_similarity", "logit_effect[positive]"} <= set(table.columns)
    auc_pos = load_stats(tiny_run, "finetuned", 2)["selectivity_auroc"][:, 1].numpy()[table["feature"].to_numpy()]
    expected = np.where(auc_pos >= 0.55, "positive", np.where(auc_pos <= 0.45, "negative", None))  # two classes: AUROC_neg = 1 - AUROC_pos
    assert [None if pd.isna(b) else b for b in table["best_class"]] == list(expected)  # missing, not a class name
    assert ((auc_pos > 0.45) & (auc_pos < 0.55)).any(), "some feature prefers no class (None, not a class name)"
    assert {"positive", "negative"} <= set(table["best_class"]), "features of a fine-tuned classifier fire for both classes"
    card = feature_card(tiny_run, "finetuned", 2, int(table["feature"][0]))
    assert card["top_examples"], "the top-variance feature fires somewhere"
    ex = card["top_examples"][0]
    assert ex["activations"][ex["center"]] == pytest.approx(ex["value"], rel=1e-2)
    assert sum(card["histogram"]["counts"]) > 0 and card["match"]["status"] in {"kept", "shifted", "new", "dead"}
    with pytest.raises(LayerscopeError, match="does not exist"):
        feature_card(tiny_run, "finetuned", 2, 10**6)
    # one window per text, at its strongest token: the stored top tokens, a text's later ones left out
    stats, repeated = load_stats(tiny_run, "finetuned", 2), 0
    for f in table["feature"][:20].tolist():
        values, texts = stats["top_values"][f].tolist(), stats["top_example_ids"][f].tolist()
        firsts = [(t, v) for j, (t, v) in enumerate(zip(texts, values)) if v > 0 and t not in texts[:j]]
        repeated += sum(v > 0 for v in values) - len(firsts)
        assert [(e["example_id"], pytest.approx(e["value"])) for e in feature_card(tiny_run, "finetuned", 2, f)["top_examples"]] == firsts
    assert repeated > 0  # some top tokens share a text, so leaving them out is exercised


def test_a_best_class_is_named_only_when_its_own_auroc_reaches_the_bar(tiny_run, monkeypatch):
    """Three classes: a feature that fires less for one class (AUROC 0.30) but barely more for
    another (0.52) prefers none; 0.56 names its class."""
    from core import features_step
    from core.features_step import CLASS_PREFERENCE, feature_table, load_stats

    s = dict(load_stats(tiny_run, "finetuned", 2))
    m = len(s["variance"])
    auc = torch.full((m, 3), 0.5)
    auc[0] = torch.tensor([0.30, 0.52, 0.50])
    auc[1] = torch.tensor([0.20, 0.5 + CLASS_PREFERENCE + 0.01, 0.50])
    auc[2] = float("nan")
    s.update(selectivity_auroc=auc, mean_per_class=torch.zeros(m, 3), logit_effect=torch.zeros(m, 3))
    monkeypatch.setattr(features_step, "load_stats", lambda *args, **kwargs: s)
    monkeypatch.setattr(RunFolder, "labels", lambda self: ["a", "b", "c"])
    best = feature_table(tiny_run, "finetuned", 2).set_index("feature")["best_class"]
    assert [None if pd.isna(best[f]) else best[f] for f in (0, 1, 2)] == [None, "b", None]


def test_a_feature_without_a_partner_similarity_reads_as_missing(tiny_run, tmp_path):
    """Matching stores a NaN similarity (a zero decoder row) as NO_SIMILARITY, JSON having no NaN:
    the table shows it missing and the card and the explorer None, never the number -2."""
    from core.analysis import load_bundle, matched_features, sentence_state
    from core.features_step import feature_card, feature_table
    from core.files import write_json
    from core.runfolder import NO_SIMILARITY, read_json

    run = RunFolder(tmp_path / "copy")
    shutil.copytree(tiny_run.root, run.root)
    match = read_json(run.matching_path(2))
    sims = match["similarity_of_finetuned"]
    feature = next(f for f, v in enumerate(sims) if v >= -1 and sims[f + 1] >= -1)  # it and the next have a similarity
    missing = feature_table(run, "finetuned", 2)["match_similarity"].isna().sum()  # the tiny run's dead features
    sims[feature] = NO_SIMILARITY
    write_json(run.matching_path(2), match)
    table = feature_table(run, "finetuned", 2).set_index("feature")
    assert np.isnan(table.loc[feature, "match_similarity"]) and table["match_similarity"].isna().sum() == missing + 1
    assert feature_card(run, "finetuned", 2, feature)["match"]["similarity"] is None
    bundle = load_bundle(run)
    got = matched_features(bundle, sentence_state(bundle, "a fine film"), 2, feature, "finetuned")
    assert got["similarity"] is None
    assert matched_features(bundle, sentence_state(bundle, "a fine film"), 2, feature + 1, "finetuned")["similarity"] >= -1


# ---------------------------------------------------------------- bad input
@pytest.fixture
def run_copy(tmp_path, tiny_run):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_run.root, dst)
    return dst


def _relu_numpy(sae: SparseAutoencoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The paper's Linear-ReLU-Linear written out by hand (no b_dec before the encoder, unlike
    TopK): (latents, reconstruction)."""
    p = {k: v.detach().double().numpy() for k, v in sae.named_parameters()}
    s = sae.cfg.normalization_scale
    h = np.maximum(x / s @ p["W_enc"] + p["b_enc"], 0)
    return h, (h @ p["W_dec"] + p["b_dec"]) * s


def test_the_paper_recipe_on_mean_pooled_texts_runs_through_every_step(run_copy):
    """``saes.architecture=paper`` with ``saes.input=mean_pooled`` (the paper's own code's input):
    trained on one mean vector per text (checked against per-text means of the stored tokens),
    scored per token like every SAE, and read by the features step and ``analyze``."""
    from core.runfolder import RunFolder

    run = RunFolder(run_copy)
    sets = ["--set", "saes.architecture=paper", "--set", "saes.input=mean_pooled", "--set", "saes.training.batch_size=16", "--set", "saes.epochs=2"]
    assert cli("saes", "--run", run_copy, *sets, "--force").returncode == 0
    train, test = ActivationStore(run, "train"), ActivationStore(run, "test")
    example = train.all_meta()["example_ids"].numpy()
    for model, layer, folder in run.sae_dirs():
        x = train.load_layer(model, layer).double().numpy()
        means = np.stack([x[example == e].mean(0) for e in np.unique(example)])  # [texts, d]: the rows it trains on
        pooled = torch.cat(list(train.iter_batches(model, layer, 1, epochs=1.0, pooled=True))).double().numpy()
        order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731 - iter_batches shuffles; compare as sets of rows
        np.testing.assert_allclose(order(pooled), order(means), rtol=1e-5, atol=1e-6)
        metrics = json.loads((folder / "metrics.json").read_text())
        sae = SparseAutoencoder.load(folder)
        assert sae.cfg.architecture == metrics["architecture"] == "paper" and sae.cfg.input == "mean_pooled"
        assert metrics["training"]["num_steps"] == int(2 * len(means) // 16)  # two epochs of 16-text batches
        xt = test.load_layer(model, layer).double().numpy()
        h, x_hat = _relu_numpy(sae, xt)
        assert metrics["fvu"] == pytest.approx(((xt - x_hat) ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum(), rel=1e-4)
        assert metrics["l0"] == pytest.approx((h > 0).sum(1).mean(), rel=1e-4)
    assert cli("features", "--run", run_copy, "--force").returncode == 0
    out = cli("analyze", "--run", run_copy, "--text", "the plot was brilliant", "--top", "3", "--json", "--raw")
    result = json.loads(out.stdout)
    from core.models import load_tokenizer

    ids = load_tokenizer(str(run.model_dir("finetuned")))("the plot was brilliant")["input_ids"]
    hidden = direct_hidden_states(run, ids)
    assert result["saes"] and all(len(e["features"]) == 3 for e in result["saes"])
    for entry in result["saes"]:
        h, _ = _relu_numpy(SparseAutoencoder.load(run.sae_dir(entry["model"], entry["layer"])), hidden[entry["model"]][entry["layer"]])
        for f in entry["features"]:
            np.testing.assert_allclose(f["activations"], h[:, f["feature"]], atol=1e-4)


def test_the_feature_card_shows_every_top_example_the_step_kept(run_copy):
    """With features.top_k=16 the card lists up to 16 texts (it stopped at 10 before), and ``top``
    still caps it."""
    from core.features_step import feature_card, load_stats
    from core.runfolder import RunFolder

    assert cli("features", "--run", run_copy, "--set", "features.top_k=16", "--force").returncode == 0
    run = RunFolder(run_copy)
    stats = load_stats(run, "finetuned", 2)
    assert stats["top_values"].shape[1] == 16
    longest = 0
    for f in range(stats["top_values"].shape[0]):
        texts = [t for t, v in zip(stats["top_example_ids"][f].tolist(), stats["top_values"][f].tolist()) if v > 0]
        card = feature_card(run, "finetuned", 2, f)
        assert [e["example_id"] for e in card["top_examples"]] == list(dict.fromkeys(texts))  # each text once, strongest first
        assert len(feature_card(run, "finetuned", 2, f, top=3)["top_examples"]) <= 3
        longest = max(longest, len(card["top_examples"]))
    assert longest > 10


def test_truncated_sae_file(run_copy):
    w = run_copy / "saes" / "finetuned" / "layer_1" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert_user_error(cli("analyze", "--run", run_copy, "--text", "hello"), "truncated")


def test_sae_of_another_width(run_copy):
    folder = run_copy / "saes" / "finetuned" / "layer_1"
    SparseAutoencoder(__import__("core.sae", fromlist=["SAEConfig"]).SAEConfig(d_in=16, d_sae=32, k=4)).save(folder)
    assert_user_error(cli("analyze", "--run", run_copy, "--text", "hello"), "16-wide", "hidden size is 32")


def test_saes_record_the_weights_they_were_trained_on(tiny_run):
    import hashlib

    from core.models import model_fingerprint
    from core.saes import load_sae

    prints = {}
    for m in ("pretrained", "finetuned"):
        weights = tiny_run.model_dir(m) / "model.safetensors"
        prints[m] = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]  # independent of core's chunked read
        assert model_fingerprint(tiny_run.model_dir(m)) == prints[m]
        assert load_sae(tiny_run, m, 1).cfg.model_fingerprint == prints[m]
    assert prints["pretrained"] != prints["finetuned"]


def test_sae_of_other_weights_is_refused(run_copy):
    """The fine-tuned model is changed after its SAEs were trained (e.g. fine-tuned again)."""
    from safetensors.torch import load_file, save_file

    weights = run_copy / "models" / "finetuned" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert_user_error(cli("analyze", "--run", run_copy, "--text", "hello"), "trained on other finetuned weights", "saes --run")
    from core.runfolder import RunFolder
    from core.saes import load_sae

    load_sae(RunFolder(run_copy), "pretrained", 1)  # the untouched model's SAEs still load
    with pytest.raises(LayerscopeError, match="fingerprint"):
        load_sae(RunFolder(run_copy), "finetuned", 1)


def test_sae_of_the_other_model_is_refused(run_copy):
    shutil.rmtree(run_copy / "saes" / "pretrained" / "layer_2")
    shutil.copytree(run_copy / "saes" / "finetuned" / "layer_2", run_copy / "saes" / "pretrained" / "layer_2")
    assert_user_error(cli("analyze", "--run", run_copy, "--text", "hello"), "trained on the finetuned model", "pretrained SAEs")


def test_k_larger_than_dictionary(run_copy):
    assert_user_error(cli("saes", "--run", run_copy, "--sae-k", "9999", "--force"), "k=9999", "d_sae")


def test_a_batch_larger_than_the_training_tokens_is_refused(run_copy):
    tokens = json.loads((run_copy / "activations" / "train" / "index.json").read_text())["num_tokens"]
    assert_user_error(cli("saes", "--run", run_copy, "--set", f"saes.training.batch_size={tokens + 1}", "--force"), f"is more than the {tokens:,} training rows (tokens)")
    assert_user_error(cli("saes", "--run", run_copy, "--set", "saes.training.batch_size=99999999999999999999999", "--force"), "must be a number <= 16,777,216 (tokens per step)")  # before any run file is read


def test_negative_splice_sample_is_refused(run_copy):
    before = (run_copy / "saes" / "finetuned" / "layer_1" / "metrics.json").read_bytes()
    assert_user_error(cli("saes", "--run", run_copy, "--set", "saes.splice_examples=-3", "--force"), "splice_examples=-3", "none for all")
    assert (run_copy / "saes" / "finetuned" / "layer_1" / "metrics.json").read_bytes() == before


def test_splice_check_on_a_sample_of_the_test_texts(run_copy):
    """saes.splice_examples=N judges every SAE on the same seeded N test texts (pandas' seeded
    sample of the test split): accuracies and KL against a hand-made hook on those texts."""
    from scipy.stats import entropy

    from core.data import load_split
    from core.runfolder import RunFolder

    cli("saes", "--run", run_copy, "--layers", "1", "--set", "saes.splice_examples=5", "--force", check=True)
    run = RunFolder(run_copy)
    sample = load_split(run, "test").sample(n=5, random_state=0)
    probabilities = _hand_spliced_probabilities(run, sample["text"].tolist())
    p_ref, y = probabilities(), sample["label"].to_numpy()
    for m in MODELS:
        metrics = json.loads(run.sae_metrics_path(m, 1).read_text())
        p_spl = probabilities(1, SparseAutoencoder.load(run.sae_dir(m, 1)))
        assert metrics["splice_texts"] == 5
        assert metrics["accuracy_original"] == pytest.approx((p_ref.argmax(1) == y).mean())
        assert metrics["accuracy_spliced"] == pytest.approx((p_spl.argmax(1) == y).mean())
        assert metrics["kl_spliced"] == pytest.approx(entropy(p_ref, p_spl, axis=1).mean(), rel=1e-2, abs=1e-7)  # bf16: see the KL test


def test_report_reads_older_runs_spliced_figures_for_pretrained_saes(run_copy):
    """Older runs spliced pre-trained SAEs into the untrained-head pre-trained model and kept the
    fine-tuned classifier's figures under ``*_spliced_into_finetuned``: the report shows those."""
    from core.runfolder import RunFolder

    path = run_copy / "saes" / "pretrained" / "layer_1" / "metrics.json"
    m = json.loads(path.read_text())
    m.pop("spliced_into")
    m.update(accuracy_spliced=0.5, kl_spliced=1e-6, accuracy_original=0.49, accuracy_spliced_into_finetuned=0.875, kl_spliced_into_finetuned=0.02)
    path.write_text(json.dumps(m))
    rows = {(s["model"], s["layer"]): s for s in build_report(RunFolder(run_copy))["saes"]}
    old = rows[("pretrained", 1)]
    assert (old["accuracy_spliced"], old["kl_spliced"], old["spliced_into"]) == (0.875, 0.02, "finetuned")
    assert "accuracy_original" not in old and "accuracy_spliced_into_finetuned" not in old
    new = json.loads((run_copy / "saes" / "finetuned" / "layer_1" / "metrics.json").read_text())
    assert rows[("finetuned", 1)]["accuracy_spliced"] == new["accuracy_spliced"]  # current runs pass unchanged


def test_empty_activation_shard(run_copy):
    from safetensors.torch import save_file

    shard = run_copy / "activations" / "train" / "pretrained_00000.safetensors"
    save_file({f"layer_{i}": torch.zeros(0, 32) for i in range(3)}, str(shard))
    assert_user_error(cli("saes", "--run", run_copy, "--force"), "empty")


def test_dying_latents_restart_at_a_lower_learning_rate(tiny_run):
    import dataclasses

    from core.saes import SAEsConfig, train_one

    store = ActivationStore(tiny_run, "train")
    base = SAEsConfig(k=2, expansion_factor=4, epochs=1)
    trip = dataclasses.replace(base, training=dataclasses.replace(base.training, batch_size=64, dead_steps_threshold=1, dead_backoff=0.0))
    _, hist = train_one(tiny_run, trip, "finetuned", 2, store, "bert.encoder.layer.1", progress=False)
    assert hist["lr_backoff"]["dead_fraction"] > 0 and hist["lr_backoff"]["at_step"] == 1
    assert hist["lr"] == pytest.approx(base.training.lr / base.lr_backoff)
    _, hist = train_one(tiny_run, dataclasses.replace(trip, lr_backoff=0), "finetuned", 2, store, "bert.encoder.layer.1", progress=False)
    assert "lr_backoff" not in hist and hist["lr"] == base.training.lr


def test_logit_effects_equal_finite_differences_of_the_ablation_direction(tiny_run):
    """Attribution patching (one backward per class, all layers at once) against central finite
    differences in float64: effect[f, c] = mean_examples d/de logit_c(h + e * V_f), where V_f puts
    a_f(t) * scale * W_dec[f] on every token t of the SAE's layer."""
    from core.data import load_split, stratified_sample
    from core.features_step import load_stats, logit_effects
    from core.models import encode, hidden_state_module, load_classifier, load_tokenizer
    from core.saes import load_sae

    mc = tiny_run.manifest()["config"]["model"]
    saes = {layer: load_sae(tiny_run, "finetuned", layer) for layer in (1, 2)}
    n = 6
    got = logit_effects(tiny_run, saes, n, mc["max_length"], mc["truncation"])
    n_step = tiny_run.manifest()["config"]["features"]["effect_examples"]
    for layer in (1, 2):  # the features step (both layers at once) stored what one layer alone gives
        torch.testing.assert_close(load_stats(tiny_run, "finetuned", layer)["logit_effect"], logit_effects(tiny_run, {layer: saes[layer]}, n_step, mc["max_length"], mc["truncation"])[layer])

    folder = str(tiny_run.model_dir("finetuned"))
    model32, model64 = load_classifier(folder).eval(), load_classifier(folder).eval().double()
    tok = load_tokenizer(folder)
    ids = encode(tok, stratified_sample(load_split(tiny_run, "test"), n)["text"].tolist(), mc["max_length"], mc["truncation"])
    for layer, sae in saes.items():
        module64 = hidden_state_module(model64, layer)[1]
        features = torch.argsort(got[layer].abs().sum(1), descending=True)[:3]  # the features that matter most
        assert got[layer].abs().max() > 0
        for f in features.tolist():
            expected = torch.zeros(model64.config.num_labels, dtype=torch.float64)
            for x in ids:
                input_ids = torch.tensor([x])
                with torch.no_grad():
                    h = model32(input_ids=input_ids, output_hidden_states=True).hidden_states[layer][0]  # [T, d]
                    a = sae.encode(h)[:, f].double()  # [T]
                V = a[:, None] * (sae.W_dec[f].detach().double() * sae.cfg.normalization_scale)  # [T, d]
                eps = 1e-4

                def logits_with(delta):
                    def hook(_m, _i, output):
                        hs = output[0] if isinstance(output, tuple) else output
                        return (hs + delta, *output[1:]) if isinstance(output, tuple) else hs + delta

                    handle = module64.register_forward_hook(hook)
                    try:
                        with torch.no_grad():
                            return model64(input_ids=input_ids).logits[0]
                    finally:
                        handle.remove()

                expected += (logits_with(eps * V) - logits_with(-eps * V)) / (2 * eps)
            expected /= len(ids)
            torch.testing.assert_close(got[layer][f].double(), expected, rtol=2e-3, atol=1e-5)


def test_matched_feature_out_of_range_is_one_clear_error(tiny_run):
    from core.analysis import load_bundle, matched_features, sentence_state

    bundle = load_bundle(tiny_run)
    state = sentence_state(bundle, "the plot was brilliant", clean=False)
    d_sae = bundle.saes[("pretrained", 1)].cfg.d_sae
    assert matched_features(bundle, state, 1, d_sae - 1)["feature_pretrained"] == d_sae - 1
    for bad in (d_sae, -1):
        with pytest.raises(LayerscopeError, match=f"no feature {bad} in the pre-trained SAE of layer 1"):
            matched_features(bundle, state, 1, bad)
        with pytest.raises(LayerscopeError, match=f"no feature {bad} in the fine-tuned SAE of layer 1"):
            matched_features(bundle, state, 1, bad, "finetuned")


def test_sentence_features_apply_one_dictionary_to_both_models(tiny_run):
    """``sentence_features``: one SAE's feature on the pre-trained and on the fine-tuned model's hidden
    states of the sentence (a hand encode of hidden states straight from transformers), their
    difference fine-tuned - pre-trained, and one clear error for a feature the SAE does not have."""
    from core.analysis import load_bundle, sentence_features, sentence_state

    bundle = load_bundle(tiny_run)
    state = sentence_state(bundle, "the plot was brilliant but the acting was dull", clean=False)
    hidden = direct_hidden_states(tiny_run, list(state.token_ids))
    for sae_model in MODELS:
        for layer in (1, 2):
            sae = bundle.saes[(sae_model, layer)]
            z = {m: _encode_numpy(sae, hidden[m][layer]) for m in MODELS}  # [T, d_sae]: the same dictionary on both models
            moved = np.abs(z["finetuned"] - z["pretrained"]).sum(0)
            assert moved.max() > 1e-2  # fine-tuning moved some feature: the two rows differ
            for feature in (int(moved.argmax()), int(z[sae_model].sum(0).argmax())):  # the most moved, the loudest
                got = sentence_features(bundle, state, layer, feature, sae_model)
                assert got["tokens"] == state.tokens
                for m in MODELS:
                    np.testing.assert_allclose(got[m], z[m][:, feature], atol=1e-4, err_msg=f"{sae_model} SAE, layer {layer}, feature {feature} on {m}")
                np.testing.assert_allclose(got["difference"], np.subtract(got["finetuned"], got["pretrained"]), rtol=0, atol=1e-6)
                np.testing.assert_allclose(got["difference"], z["finetuned"][:, feature] - z["pretrained"][:, feature], atol=2e-4)
        d_sae = bundle.saes[(sae_model, 1)].cfg.d_sae
        sentence_features(bundle, state, 1, d_sae - 1, sae_model)  # the last feature exists
        for bad in (d_sae, -1):
            with pytest.raises(LayerscopeError, match=f"no feature {bad} in the {sae_model} SAE of layer 1"):
                sentence_features(bundle, state, 1, bad, sae_model)


def test_a_matched_pair_reads_the_same_from_either_dictionary(tiny_run):
    """The matching is one-to-one: asking from the fine-tuned feature gives the pair that asking
    from its pre-trained partner gives, each on its own model (checked against a hand encode of
    hidden states straight from transformers); a feature without a partner gets zeros."""
    from core.analysis import load_bundle, matched_features, sentence_state
    from core.features_step import load_matching

    bundle = load_bundle(tiny_run)
    state = sentence_state(bundle, "the plot was brilliant and the cast was dull", clean=False)
    hidden = direct_hidden_states(tiny_run, list(state.token_ids))
    fired = 0
    for layer in (1, 2):
        match = load_matching(tiny_run, layer)
        z = {m: _encode_numpy(bundle.saes[(m, layer)], hidden[m][layer]) for m in MODELS}  # each SAE on its own model
        for f, p in enumerate(match["partner_of_finetuned"]):
            got = matched_features(bundle, state, layer, f, "finetuned")
            assert (got["feature_finetuned"], got["feature_pretrained"], got["sae_model"]) == (f, p, "finetuned")
            assert got["status"] == match["status_of_finetuned"][f]
            np.testing.assert_allclose(got["finetuned"], z["finetuned"][:, f], atol=1e-4, err_msg=f"layer {layer}, feature {f}")
            fired += bool(np.any(z["finetuned"][:, f] > 0))
            if p < 0:
                assert got["pretrained"] == [0.0] * len(state.tokens)
                continue
            np.testing.assert_allclose(got["pretrained"], z["pretrained"][:, p], atol=1e-4, err_msg=f"layer {layer}, partner {p}")
            assert match["partner_of_pretrained"][p] == f
            back = matched_features(bundle, state, layer, p, "pretrained")
            assert {k: back[k] for k in ("feature_pretrained", "feature_finetuned", "pretrained", "finetuned", "difference")} == {k: got[k] for k in ("feature_pretrained", "feature_finetuned", "pretrained", "finetuned", "difference")}
    assert fired > 0  # some features fire on the sentence: the comparison is not of zeros only


def test_without_the_features_step_the_ranking_names_what_was_used(run_copy):
    """Before the features step, every ranking falls back to variance over the sentence, and says so."""
    from core.analysis import analyze_text, load_bundle
    from core.runfolder import RunFolder

    shutil.rmtree(run_copy / "features")
    run = RunFolder(run_copy)
    m = run.manifest()
    m["steps"].pop("features", None)
    run.write_manifest(m)
    bundle = load_bundle(run)
    by_variance = analyze_text(bundle, "the plot was brilliant", top=3, rank_by="variance", clean=False)
    by_density = analyze_text(bundle, "the plot was brilliant", top=3, rank_by="density", clean=False)
    assert by_density["ranking"].startswith("variance over this sentence") and "density" in by_density["ranking"]
    assert [e["features"] for e in by_density["saes"]] == [e["features"] for e in by_variance["saes"]]


def test_sae_in_another_layers_folder_is_refused(run_copy):
    shutil.rmtree(run_copy / "saes" / "finetuned" / "layer_2")
    shutil.copytree(run_copy / "saes" / "finetuned" / "layer_1", run_copy / "saes" / "finetuned" / "layer_2")
    for out in (cli("analyze", "--run", run_copy, "--text", "hello"), cli("features", "--run", run_copy, "--force")):
        assert_user_error(out, "trained on hidden state 1", "folder of layer 2", "layer_1", f"python -m core saes --run {run_copy} --force")


def test_a_dictionary_too_large_for_free_memory_is_refused_before_training(tiny_run, tmp_path, monkeypatch, capsys):
    """The bound is 4 bytes x (4 x 2 x d_in x d_sae + batch x d_sae): one byte less free is refused
    (by the saes verb, before it writes anything), one byte more is not."""
    from core import saes
    from core.__main__ import main
    from core.saes import SAEsConfig, check_memory

    cfg = SAEsConfig(d_sae=1000)
    cfg.training.batch_size = 64
    need = 4 * (4 * 2 * 32 * 1000 + 64 * 1000)
    monkeypatch.setattr(saes, "available_memory_bytes", lambda: need)
    check_memory(cfg, 32)
    monkeypatch.setattr(saes, "available_memory_bytes", lambda: need - 1)
    with pytest.raises(LayerscopeError, match=r"an SAE of 1,000 latents on 32-wide hidden states needs at least 0\.0 GiB .* lower saes\.d_sae or saes\.training\.batch_size"):
        check_memory(cfg, 32)
    monkeypatch.setattr(saes, "available_memory_bytes", lambda: None)  # unknown: never refused
    check_memory(cfg, 32)

    run = tmp_path / "copy"
    shutil.copytree(tiny_run.root, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    monkeypatch.setattr(saes, "available_memory_bytes", lambda: 2**20)
    assert main(["saes", "--run", str(run), "--force", "--set", "saes.d_sae=100000"]) == 2
    assert "needs at least" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_free_memory_is_read_from_the_system():
    import os

    from core.rss import available_memory_bytes

    free = available_memory_bytes()
    if free is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if shutil.which("free"):  # procps's own reading of the same figure (its "available" column)
        import subprocess

        lines = subprocess.run(["free", "-b"], capture_output=True, text=True, check=True).stdout.splitlines()
        available = int(lines[1].split()[1 + lines[0].split().index("available")])
        assert abs(free - available) < 256 * 2**20, (free, available)
