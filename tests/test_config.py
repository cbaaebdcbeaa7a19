import dataclasses

import re

import pytest

from core.config import RunConfig, available_presets, changed_fields, load_config, parse_set_flags
from core.errors import LayerscopeError


def test_defaults_presets_file_and_overrides_layer(tmp_path):
    assert {"default", "paper", "quality", "tiny"} <= set(available_presets())
    paper = load_config(preset="paper")
    assert paper.finetune.epochs == 10 and paper.data.max_rows == 25000 and paper.saes.layers == [3, 6, 12]
    assert paper.activations.train_layers == paper.saes.layers  # the train split keeps what the SAEs read
    f = tmp_path / "c.toml"
    f.write_text("[finetune]\nepochs = 3\n[saes]\nk = 16\n")
    cfg = load_config(preset="paper", config_file=f, overrides=parse_set_flags(["finetune.epochs=4", "saes.layers=1,2"]))
    assert cfg.finetune.epochs == 4.0 and cfg.saes.k == 16 and cfg.saes.layers == [1, 2]
    assert cfg.finetune.learning_rate == 2e-5  # from the preset


def _flat(cfg, prefix=""):
    """{"section.field": value} of a RunConfig (nested sections joined by dots)."""
    out = {}
    for key, value in (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_quality_preset_is_the_default_run_with_more_sae_data_and_latents():
    # README "SAE quality" compares the two runs: any other difference (say, a new default
    # learning rate not copied over) would make that comparison wrong
    default, quality = _flat(load_config(preset="default")), _flat(load_config(preset="quality"))
    changed = {k: (default[k], quality[k]) for k in default if default[k] != quality[k]}
    assert changed == {
        "data.max_rows": (6000, 12500),
        "activations.sae_examples": (2000, 10000),
        "activations.eval_examples": (400, 1000),
        "saes.expansion_factor": (4, 8),
        "saes.training.lr": (4e-3, 2e-3),
    }


def test_saved_config_round_trips():
    cfg = load_config(overrides={"data.max_rows": "123", "finetune.bf16": "false"})
    again = load_config(base=cfg.to_dict())
    assert again == cfg and again.data.max_rows == 123 and again.finetune.bf16 is False
    assert cfg.section_hash("data") != RunConfig().section_hash("data")


def test_a_runs_saved_config_is_what_it_was_built_with(tiny_run):
    from core.config import saved_config

    cfg = saved_config(tiny_run)
    assert cfg.to_dict() == tiny_run.manifest()["config"]
    assert cfg != RunConfig()  # the tiny run's settings, not the defaults


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"finetune.epoch": "2"}, "did you mean 'finetune.epochs'"),
        ({"data.max_rows": "many"}, "expects an integer"),
        ({"finetune.bf16": "maybe"}, "true or false"),
        ({"nosuch.x": "1"}, "unknown option 'nosuch'"),
        ({"saes.k": True}, "expects an integer, got True"),  # TOML `k = true`
        ({"model.base": ["x"]}, "expects a string, got \\['x'\\]"),
        ({"saes.layers": {"a": 1}}, "expects a list such as"),
    ],
)
def test_bad_options(overrides, message):
    with pytest.raises(LayerscopeError, match=message):
        load_config(overrides=overrides)


def test_a_single_number_for_a_list_option_is_a_list_of_one():
    assert load_config(overrides={"saes.layers": 3}).saes.layers == [3]  # TOML `layers = 3`
    assert load_config(overrides={"saes.layers": "[1, 3]"}).saes.layers == [1, 3]  # --set written as TOML
    assert load_config(overrides={"saes.layers": "1,3"}).saes.layers == [1, 3]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"finetune.epochs": "-1"}, "finetune.epochs=-1.0 must be a number > 0"),
        ({"finetune.epochs": "nan"}, "finetune.epochs=nan must be a number > 0"),
        ({"finetune.batch_size": "0"}, "finetune.batch_size=0 must be a number >= 1"),
        ({"finetune.warmup_ratio": "1.5"}, "finetune.warmup_ratio=1.5 must be a fraction in [0, 1)"),
        ({"finetune.warmup_ratio": "1"}, "finetune.warmup_ratio=1.0 must be a fraction in [0, 1)"),  # transformers would read 1 step
        ({"model.max_length": "2"}, "model.max_length=2 must be a number >= 4"),
        ({"model.truncation": "tail"}, "model.truncation='tail' must be one of 'head', 'head_tail'"),
        ({"data.max_rows": "-5"}, "data.max_rows=-5 must be a number >= 0"),
        ({"data.val_fraction": "0.5", "data.test_fraction": "0.5"}, "data.test_fraction=0.5 must be less than 1 - data.val_fraction"),
        ({"data.test_fraction": "0"}, "data.test_fraction=0.0 must be a fraction in (0, 1)"),
        ({"data.test_fraction": "1"}, "data.test_fraction=1.0 must be a fraction in (0, 1)"),
        ({"activations.storage_dtype": "int8"}, "activations.storage_dtype='int8' must be one of"),
        ({"activations.train_layers": "1,-2"}, "activations.train_layers=[1, -2] must be a list of hidden-state indices"),
        ({"similarity.split": "val"}, "similarity.split='val' must be one of 'test', 'train'"),
        ({"saes.k": "0"}, "saes.k=0 must be a number >= 1"),
        ({"saes.d_sae": "16", "saes.k": "32"}, "saes.k=32 must be at most saes.d_sae (16)"),
        ({"saes.splice_examples": "-3"}, "none for all of them"),
        ({"saes.lr_backoff": "0.5"}, "saes.lr_backoff=0.5 must be a number >= 1"),
        ({"saes.training.lr": "-1e-3"}, "saes.training.lr=-0.001 must be a number > 0"),
        ({"saes.training.epochs": "2"}, "saes.training.epochs=2 must be 1 in the saes step"),  # its passes are saes.epochs
        ({"saes.training.resample_at": "0.5,1.2"}, "saes.training.resample_at=[0.5, 1.2] must be a list of fractions"),
        ({"features.kept_threshold": "0.3"}, "features.shifted_threshold=0.4 must be at most features.kept_threshold (0.3)"),
        ({"features.workers": "0"}, "features.workers=0 must be a number >= 1"),
    ],
)
def test_impossible_values_are_refused_before_any_work(overrides, message):
    with pytest.raises(LayerscopeError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)
    assert "--set " in str(err.value)  # and the message says how to change it


def test_every_preset_and_the_defaults_pass_validation():
    for preset in available_presets():
        load_config(preset=preset).validate()
    RunConfig().validate()
    for value in ("0", "none"):  # the documented special values stay allowed
        load_config(overrides={"saes.splice_examples": value, "saes.lr_backoff": "0", "data.max_rows": "0", "activations.sae_examples": "0"})


def test_bad_preset_and_file(tmp_path, monkeypatch):
    with pytest.raises(LayerscopeError, match="unknown preset"):
        load_config(preset="nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[finetune\n")
    with pytest.raises(LayerscopeError, match="not valid TOML"):
        load_config(config_file=bad)
    with pytest.raises(LayerscopeError, match="is a folder; pass a TOML file to --config"):
        load_config(config_file=tmp_path)
    with pytest.raises(LayerscopeError, match="not found; pass an existing TOML file"):
        load_config(config_file=tmp_path / "missing.toml")
    with pytest.raises(LayerscopeError, match="SECTION.FIELD=VALUE"):
        parse_set_flags(["epochs"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayerscopeError, match="config file tiny not found; for the preset of that name pass --preset tiny, or pass an existing TOML file"):
        load_config(config_file="tiny")


def test_a_config_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Windows editors (Notepad) start a UTF-8 file with a byte-order mark, which TOML refuses."""
    path = tmp_path / "mine.toml"
    path.write_bytes(b"\xef\xbb\xbf[saes]\nk = 16\n")
    assert load_config(config_file=path).saes.k == 16


@pytest.mark.parametrize("dotted", ["saes.training.lr.x", "saes.k.", "saes.layers.0"])
def test_a_field_under_a_setting_is_named_as_a_setting_not_shown_as_a_dict(dotted):
    setting = dotted.rsplit(".", 1)[0]
    with pytest.raises(LayerscopeError) as e:
        load_config(overrides=parse_set_flags([f"{dotted}=3"]))
    assert str(e.value) == f"option '{setting}' is a setting, not a section; give it a value: {setting}=VALUE"


@pytest.mark.parametrize("value", ["3 6", "[3 6]", "1 2,3"])
def test_a_list_option_with_items_separated_by_spaces_is_refused(value):
    """`--layers "3 6"` became [36], another layer that exists on a 12-layer model."""
    from core.config import load_config

    with pytest.raises(LayerscopeError, match="expects a comma-separated list such as 3,6"):
        load_config(overrides={"saes.layers": value})
    assert load_config(overrides={"saes.layers": "3, 6"}).saes.layers == [3, 6]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("finetune.batch_size", "99999999999999999999", "finetune.batch_size=99999999999999999999 must be a number <= 65,536"),
        ("saes.training.dead_steps_threshold", "99999999999999999999", "must be a number <= 1,000,000,000"),
        ("features.window", "100000000", "features.window=100000000 must be a number <= 512"),
        ("features.top_k", "1000000", "features.top_k=1000000 must be a number <= 1,000"),
        ("features.top_k", "300", "features.top_k=300 must be at most 294 with features.window=8"),
    ],
)
def test_counts_too_large_to_run_are_refused_before_any_work(option, value, message):
    """Each of these was a traceback (an overflow in islice or torch), or a process the kernel
    killed after taking every byte of memory, minutes into a step."""
    from core.config import load_config

    with pytest.raises(LayerscopeError, match=re.escape(message)):
        load_config(overrides={option: value})


def test_changed_fields_names_each_option_and_both_values():
    before = load_config()
    after = load_config(overrides=parse_set_flags(["saes.k=4", "saes.training.lr=0.01", "data.dataset=./x.csv", "finetune.epochs=2"]))
    assert changed_fields(before, after, ("saes",)) == ["saes.k", "saes.training.lr"]
    assert changed_fields(before, after, ("saes",), values=True) == [f"saes.k {before.saes.k} -> 4", f"saes.training.lr {before.saes.training.lr} -> 0.01"]
    assert changed_fields(before, after, ("data",), values=True) == [f'data.dataset "{before.data.dataset}" -> "./x.csv"']
    assert changed_fields(before, before, ("data", "saes")) == []


@pytest.mark.parametrize(
    "preset, fix",
    [
        ("default.toml", "--preset takes a preset's name: pass --preset default"),
        ("core/presets/quality.toml", "pass --preset quality"),
        ("mine.toml", "pass --config mine.toml"),
        ("Qualty", "did you mean --preset quality?"),
        ("nope", "choose one of: "),
    ],
)
def test_an_unknown_preset_says_what_to_pass_instead(preset, fix):
    with pytest.raises(LayerscopeError) as e:
        load_config(preset=preset)
    assert f"unknown preset '{preset}'" in str(e.value) and fix in str(e.value)
