"""Run configuration: one dataclass per pipeline step, grouped in ``RunConfig``.

Where a value comes from, lowest priority first:
  1. the dataclass defaults of each step's config,
  2. a preset TOML in ``core/presets/``: ``default`` unless ``--preset`` names another,
  3. a user TOML file (``--config my.toml``), same layout as the presets,
  4. ``--set section.field=value`` flags and the CLI's shortcut flags.
The resolved config is written into the run's manifest, so a run can always be
rebuilt exactly. Field docs live next to each dataclass in its step module.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import shlex
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from core.activations import ActivationsConfig
from core.data import DataConfig
from core.errors import LayerscopeError, user_path
from core.features_step import FeaturesConfig
from core.finetune import FinetuneConfig
from core.models import ModelConfig
from core.saes import SAEsConfig
from core.similarity import SimilarityConfig

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    saes: SAEsConfig = field(default_factory=SAEsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Refuse impossible values (negative epochs, unknown choices...) before any step starts."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections: a step is stale when the hash of what it reads changes."""
        blob = json.dumps({s: hashed_fields(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_fields(before: RunConfig, after: RunConfig, sections: tuple[str, ...], *, values: bool = False) -> list[str]:
    """``section.field`` names (``saes.training.lr`` inside a nested section) whose values differ
    between two configs, among those the section hashes cover (what a step's ``config_hash``
    sees). ``values`` adds both values, as TOML spells them: ``saes.k 32 -> 4``."""
    changed = []
    for s in sections:
        a, b = _flat(hashed_fields(getattr(before, s)), s), _flat(hashed_fields(getattr(after, s)), s)
        full_a, full_b = _flat(dataclasses.asdict(getattr(before, s)), s), _flat(dataclasses.asdict(getattr(after, s)), s)
        for name in sorted(a.keys() | b.keys()):
            if a.get(name) != b.get(name):
                changed.append(f"{name} {json.dumps(full_a.get(name))} -> {json.dumps(full_b.get(name))}" if values else name)
    return changed


def _flat(d: dict, prefix: str) -> dict:
    """{"training": {"lr": 1}} -> {"saes.training.lr": 1}: one entry per option a user can --set."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def hashed_fields(section) -> dict:
    """``asdict(section)`` less the fields marked ``metadata={"execution_only": True}`` and those
    marked ``metadata={"hash_when_set": True}`` that hold their default: options added after runs
    were built leave those runs' step hashes unchanged."""
    d = dataclasses.asdict(section)
    for f in dataclasses.fields(section):
        if f.metadata.get("execution_only"):  # how the work is spread, not what it computes
            del d[f.name]
        elif f.metadata.get("hash_when_set"):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if d[f.name] == default:
                del d[f.name]
    return d


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _coerce(value, typ, where: str):
    """Turn a TOML value or a ``--set`` string into the declared field type."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        raise LayerscopeError(f"option {where} expects true or false, got {value!r}")
    if typ in (int, float, str):
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, (bool, list, dict)):  # int(True) == 1, str(["x"]) == "['x']": a slip, not a value
                raise TypeError
            return typ(value)
        except (TypeError, ValueError):
            kind = {"int": "an integer", "float": "a number", "str": "a string"}[typ.__name__]
            raise LayerscopeError(f"option {where} expects {kind}, got {value!r}") from None
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):  # --set x=1,2 or, as in TOML, x=[1,2]
            if re.search(r"[^\s,\[]\s+[^\s,\]]", value):  # "3 6" read as 36 would be a valid, other layer
                raise LayerscopeError(f"option {where} expects a comma-separated list such as 3,6, got {value!r}; separate the items with commas")
            value = [v for v in value.replace(" ", "").removeprefix("[").removesuffix("]").split(",") if v]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `layers = 3` in a TOML file means [3]
        elif not isinstance(value, list):
            raise LayerscopeError(f"option {where} expects a list such as [1, 2], got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null", ""}):
            return None
        return _coerce(value, args[0], where)
    return value


def _apply(obj, updates: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise LayerscopeError(f"unknown option '{where}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise LayerscopeError(f"option '{where}' is a section; set its fields as {where}.FIELD=VALUE")
            _apply(current, value, f"{where}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _nest(dotted: dict[str, object]) -> dict:
    """{"a.b": 1, "a.c": 2} -> {"a": {"b": 1, "c": 2}}."""
    out: dict = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node_type = RunConfig
        for i, p in enumerate(parts[:-1]):  # --set saes.k.x=3: past a setting, the rest would reach it as a dict
            sub = typing.get_type_hints(node_type).get(p)  # node_type is a config dataclass
            if sub is None:
                break  # an unknown name: _apply names it, with the close ones
            if not dataclasses.is_dataclass(sub):
                name = ".".join(parts[: i + 1])
                raise LayerscopeError(f"option '{name}' is a setting, not a section; give it a value: {name}=VALUE")
            node_type = sub
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # "--set finetune=x --set finetune.epochs=3"
                section = ".".join(parts[: i + 1])
                raise LayerscopeError(f"option '{section}' is a section; set its fields as {section}.FIELD=VALUE")
        node[parts[-1]] = value
    return out


def read_toml(path: str | Path) -> dict:
    path = user_path(path)
    if path.is_dir():
        raise LayerscopeError(f"config file {path} is a folder; pass a TOML file to --config (core/presets/*.toml are examples)")
    if path.exists() and not path.is_file():
        raise LayerscopeError(f"config file {path} is not a regular file (a device, pipe or socket); pass a TOML file to --config")
    if not path.is_file():
        preset = f"for the preset of that name pass --preset {path.name}, or " if not path.suffix and path.name in available_presets() else ""
        raise LayerscopeError(f"config file {path} not found; {preset}pass an existing TOML file to --config")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark, as Windows editors write, is not TOML
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LayerscopeError(f"config file {path} is not valid TOML ({e}); fix the file or drop --config") from None


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, object] | None = None,
    base: dict | None = None,
    base_source: str | None = None,
) -> RunConfig:
    """Resolve a RunConfig. ``base`` is a saved config (a run's manifest, named by ``base_source``
    in messages) to start from instead of defaults."""
    cfg = RunConfig()
    if base:
        try:
            # Every build saves every section; a field missing from one takes its default (a run
            # saved before that field existed), a whole section missing is no run's.
            missing = [f.name for f in dataclasses.fields(RunConfig) if f.name not in base]
            if missing:
                raise LayerscopeError(f"the section{'s' * (len(missing) > 1)} {', '.join(missing)} {'are' if len(missing) > 1 else 'is'} missing")
            _apply(cfg, base, "")
            cfg.validate()  # as saved: a value edited by hand is the manifest's, not the user's --set
        except LayerscopeError as e:
            # a run written by another version of Layerscope (or edited): the user typed none of this
            where = base_source or "the run's saved config"
            run = shlex.quote(str(Path(base_source).parent)) if base_source else "RUN"
            problem = str(e).split("; change it in your --config file")[0]  # OptionCheck's fix is for options typed now
            raise LayerscopeError(
                f"{where} holds a setting this version of Layerscope does not accept: {problem}. The run was "
                "built by another version, or its saved config was edited: put back the value it was built with, open it with that version, "
                f"or build it again with this one (`python -m core build --run {run} --preset default --force`, or the preset and options it was built with)"
            ) from None
    elif not preset:
        preset = "default"
    if preset:
        path = PRESET_DIR / f"{preset}.toml"
        if not path.is_file():
            raise LayerscopeError(f"unknown preset '{preset}'; {_preset_fix(preset)}")
        _apply(cfg, read_toml(path), "")
    if config_file:
        _apply(cfg, read_toml(config_file), "")
    if overrides:
        _apply(cfg, _nest(overrides), "")
    cfg.validate()
    return cfg


def _preset_fix(preset: str) -> str:
    """What to pass instead of an unknown ``--preset``: the preset it names as a file
    (``default.toml``, ``core/presets/quality.toml``), a close name, or a TOML file of one's own."""
    names = available_presets()
    stem = Path(preset).stem if preset.endswith(".toml") else preset
    if stem in names:
        return f"--preset takes a preset's name: pass --preset {stem}"
    if preset.endswith(".toml") or "/" in preset:
        return f"to build from a TOML file of your own pass --config {shlex.quote(preset)}; presets are: {', '.join(names)}"
    close = difflib.get_close_matches(preset.lower(), names, n=1)
    return f"did you mean --preset {close[0]}? presets are: {', '.join(names)}" if close else f"choose one of: {', '.join(names)}"


def saved_config(run, manifest: dict | None = None) -> RunConfig:
    """The config an existing run (a ``RunFolder``) was built with, read from its manifest
    (``manifest``, when the caller has read it already) and checked like options typed now:
    readers use this, never the manifest's raw dict, so a hand-edited value is one message."""
    m = manifest if manifest is not None else run.manifest()
    return load_config(base=m["config"], base_source=str(run.manifest_path))


def parse_set_flags(items: list[str]) -> dict[str, str]:
    """``["finetune.epochs=2", ...]`` -> ``{"finetune.epochs": "2"}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise LayerscopeError(f"--set expects SECTION.FIELD=VALUE, got {item!r} (e.g. --set finetune.epochs=2)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out
