"""Tokenising (``encode`` gives each text's ids as a direct per-text computation does, however many texts) and loading model folders."""

from __future__ import annotations

import random

import pytest

from core import models
from core.models import encode, load_tokenizer
from tests.conftest import make_sentence


@pytest.mark.parametrize("truncation", ["head", "head_tail"])
def test_encode_in_chunks_equals_one_text_at_a_time(monkeypatch, tiny_model, truncation):
    tok = load_tokenizer(str(tiny_model))
    rng = random.Random(0)
    texts = [" ".join(make_sentence(rng, i % 2) for _ in range(1 + i % 4)) for i in range(11)]  # some longer than max_length
    max_length = 16
    monkeypatch.setattr(models, "ENCODE_CHUNK", 3)  # 11 texts: chunks of 3, 3, 3 and 2
    got = encode(tok, texts, max_length, truncation)

    expected = []
    for text in texts:  # independent: one tokenizer call per text, truncation by hand
        body = tok(text, add_special_tokens=False)["input_ids"]
        room = max_length - 2
        if len(body) > room:
            body = body[:room] if truncation == "head" else body[: room // 4] + body[len(body) - (room - room // 4) :]
        expected.append([tok.cls_token_id, *body, tok.sep_token_id])
    assert got == expected
    assert max(map(len, got)) == max_length and min(map(len, got)) < max_length  # both cases occur


def test_a_folder_that_is_not_a_model_is_one_clear_error(tmp_path, tiny_model):
    """An empty folder (transformers raises ValueError: no model_type) and truncated weights."""
    import shutil

    from core.errors import LayerscopeError
    from core.models import load_classifier

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayerscopeError, match="is not a loadable model folder"):
        load_classifier(str(empty))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(LayerscopeError, match="is not a loadable model folder"):
        load_classifier(str(broken))

    with pytest.raises(LayerscopeError, match="check it has config.json and weights"):  # outside a run: what to check
        load_classifier(str(broken))


def test_a_model_folder_the_user_may_not_read_names_chmod_not_a_rebuild(tmp_path, tiny_model, monkeypatch):
    """``chmod 000`` on a model folder (simulated: the tests may run as root, whom modes do not
    stop): the message is the permission and its fix, not "not a loadable model folder"."""
    from transformers import AutoConfig

    from core.errors import LayerscopeError

    denied = str(tiny_model / "config.json")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", denied)

    monkeypatch.setattr(AutoConfig, "from_pretrained", refuse)
    with pytest.raises(LayerscopeError) as e:
        models.load_model_config(str(tiny_model))
    assert str(e.value) == f"cannot read {denied}: permission denied; give your user read access (`chmod -R u+rX {tiny_model}`), or run as its owner"


@pytest.mark.parametrize("damage", ["truncated weights", "folder removed"])
def test_a_damaged_model_of_a_run_names_the_step_that_writes_it_again(tiny_run, tmp_path, damage):
    import shutil

    from core.errors import LayerscopeError
    from core.models import load_classifier

    run = tmp_path / "my run"
    shutil.copytree(tiny_run.root, run)
    folder = run / "models" / "finetuned"
    if damage == "folder removed":
        shutil.rmtree(folder)
    else:
        weights = next(folder.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(LayerscopeError) as e:
        load_classifier(str(folder))
    assert str(e.value).endswith(f"redo the step that writes it: `python -m core finetune --run '{run}' --force`")

def test_a_config_json_edited_into_nonsense_is_one_clear_error(tmp_path, tiny_model):
    """transformers fails on a bad ``dtype`` with AttributeError (``torch.x``): from a local folder
    that is the folder's fault, so it gets the same message as any other unloadable folder."""
    import json
    import shutil

    from core.errors import LayerscopeError
    from core.models import load_classifier, load_tokenizer

    edited = tmp_path / "edited"
    shutil.copytree(tiny_model, edited)
    cfg = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**cfg, "dtype": "x"}))
    for load in (load_classifier, load_tokenizer):
        with pytest.raises(LayerscopeError, match=r"edited is not a loadable model folder \(module 'torch' has no attribute 'x'\)"):
            load(str(edited))



@pytest.mark.parametrize(
    "edit, said",
    [
        ({"num_hidden_layers": "six"}, "num_hidden_layers"),  # the config's own type checks (huggingface_hub)
        ({"vocab_size": 10}, "its weights do not have the shapes its config.json gives"),  # RuntimeError
        ({"max_position_embeddings": 8}, "its weights do not have the shapes its config.json gives"),
    ],
)
def test_config_json_values_the_weights_or_types_refuse_are_one_clear_error(tmp_path, tiny_model, edit, said):
    import json
    import shutil

    from core.errors import LayerscopeError
    from core.models import load_classifier

    edited = tmp_path / "edited"
    shutil.copytree(tiny_model, edited)
    cfg = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(LayerscopeError, match=r"edited is not a loadable model folder \(") as e:
        load_classifier(str(edited))
    assert said in str(e.value)


def test_a_file_passed_as_the_model_is_named_a_file(tmp_path):
    from core.errors import LayerscopeError
    from core.models import load_classifier

    path = tmp_path / "weights.csv"
    path.write_text("a,b\n")
    with pytest.raises(LayerscopeError, match=r"weights\.csv is a file, not a model folder; pass the folder that holds its config\.json"):
        load_classifier(str(path))


@pytest.mark.parametrize("name, alias", [("All-MiniLM-L6-v2", "all-MiniLM-L6-v2"), ("mini-lm", "minilm"), ("bert-base-uncased", None)])
def test_a_model_name_close_to_the_embedded_one_points_to_it(monkeypatch, name, alias):
    """Offline, a misspelt embedded name fails as an unknown hub id; the message names the alias meant."""
    monkeypatch.setattr(models, "_hub_unresolvable", lambda path: True)  # the hub cannot be reached, as here
    with pytest.raises(models.LayerscopeError) as e:
        models.load_model_config(name)
    said = str(e.value)
    assert f"could not load model '{name}'" in said and "download it where you have a connection" in said
    if alias:
        assert f"pass --model {alias} for the embedded model" in said
    else:
        assert "embedded" not in said
