import pytest

from core.config import RunConfig, available_presets, load_config, parse_set_flags
from core.errors import LayerscopeError


def test_defaults_presets_file_and_overrides_layer(tmp_path):
    assert {"default", "paper", "tiny"} <= set(available_presets())
    paper = load_config(preset="paper")
    assert paper.finetune.epochs == 10 and paper.data.max_rows == 25000 and paper.saes.layers == [3, 6, 12]
    assert paper.activations.train_layers == paper.saes.layers  # the train split keeps what the SAEs read
    f = tmp_path / "c.toml"
    f.write_text("[finetune]\nepochs = 3\n[saes]\nk = 16\n")
    cfg = load_config(preset="paper", config_file=f, overrides=parse_set_flags(["finetune.epochs=4", "saes.layers=1,2"]))
    assert cfg.finetune.epochs == 4.0 and cfg.saes.k == 16 and cfg.saes.layers == [1, 2]
    assert cfg.finetune.learning_rate == 2e-5  # from the preset


def test_saved_config_round_trips():
    cfg = load_config(overrides={"data.max_rows": "123", "finetune.bf16": "false"})
    again = load_config(base=cfg.to_dict())
    assert again == cfg and again.data.max_rows == 123 and again.finetune.bf16 is False
    assert cfg.section_hash("data") != RunConfig().section_hash("data")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"finetune.epoch": "2"}, "did you mean 'finetune.epochs'"),
        ({"data.max_rows": "many"}, "expects an integer"),
        ({"finetune.bf16": "maybe"}, "true or false"),
        ({"nosuch.x": "1"}, "unknown option 'nosuch'"),
    ],
)
def test_bad_options(overrides, message):
    with pytest.raises(LayerscopeError, match=message):
        load_config(overrides=overrides)


def test_bad_preset_and_file(tmp_path):
    with pytest.raises(LayerscopeError, match="unknown preset"):
        load_config(preset="nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[finetune\n")
    with pytest.raises(LayerscopeError, match="not valid TOML"):
        load_config(config_file=bad)
    with pytest.raises(LayerscopeError, match="SECTION.FIELD=VALUE"):
        parse_set_flags(["epochs"])
