"""The real embedded all-MiniLM-L6-v2 and real IMDb reviews, end to end on ~80 texts (about a minute)."""

import json

import pytest

from core.config import load_config
from core.pipeline import build
from core.report import build_report
from core.runfolder import RunFolder


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    run = RunFolder(tmp_path_factory.mktemp("minilm") / "run")
    cfg = load_config(
        overrides={
            "data.max_rows": 80,
            "model.max_length": 64,
            "finetune.epochs": 1,
            "finetune.batch_size": 16,
            "activations.sae_examples": 40,
            "activations.eval_examples": 0,
            "saes.layers": "3,6",
            "saes.epochs": 2,
            "saes.training.batch_size": 256,
            "saes.splice_examples": 8,
            "features.effect_examples": 4,
        }
    )
    build(run, cfg, log=lambda *_: None)
    return run


def test_minilm_run_report(minilm_run):
    rep = build_report(minilm_run)
    assert rep["base_model"] == "all-MiniLM-L6-v2" and rep["dataset"] == "imdb"
    assert rep["num_layers"] == 6 and len(rep["similarity"]) == 7
    assert rep["rows"]["train"] == 64 and rep["finetune"]["test_examples"] == 8
    # the embeddings barely move in one short epoch; deeper layers move more
    sim = {r["layer"]: r for r in rep["similarity"]}
    assert sim[0]["cka"] > 0.99 and sim[0]["cosine_of_means"] > 0.99
    assert all(-1 <= r["mean_cosine"] <= 1 and 0 <= r["cka"] <= 1 + 1e-9 for r in rep["similarity"])
    assert {(s["model"], s["layer"]) for s in rep["saes"]} == {(m, l) for m in ("pretrained", "finetuned") for l in (3, 6)}
    cfg = json.loads((minilm_run.sae_dir("finetuned", 6) / "cfg.json").read_text())
    assert cfg["d_in"] == 384 and cfg["d_sae"] == 1536 and cfg["hook_name"] == "bert.encoder.layer.5"


def test_minilm_analyze(minilm_run):
    from core.analysis import analyze_text, load_bundle

    result = analyze_text(load_bundle(minilm_run), "The acting was brilliant!", top=3)
    assert result["tokens"] == ["[CLS]", "the", "acting", "was", "brilliant", "[SEP]"]
    assert len(result["cosine"]) == 7 and set(result["prediction"]["probabilities"]) == {"negative", "positive"}
