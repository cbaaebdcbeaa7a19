"""Running steps against a run folder: config resolution, skipping finished steps, the manifest.

A step is skipped when the manifest records it as finished with the same settings.
When its settings changed, the user is told to pass ``--force``; a forced (re)run
forgets every later step, whose inputs just changed.

Under ``torchrun`` / ``accelerate launch`` every process takes part in the steps that
share out their work (finetune, activations); the others run on rank 0 alone. Only rank 0
writes the manifest, and all processes leave a step together, once rank 0 has recorded it,
so a rank never starts a step whose input another rank is still writing.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable

from datetime import timedelta

import torch

from core import __version__
from core.config import RunConfig, changed_fields, load_config
from core.errors import LayerscopeError, user_path
from core.runfolder import STEPS, RunFolder, core_command
from core.rss import peak_rss_mb, release_free_memory, reset_peak_rss

# which config sections each step reads: a change there makes the step stale
STEP_SECTIONS = {
    "data": ("data",),
    "finetune": ("model", "finetune"),
    "activations": ("model", "activations"),
    "similarity": ("similarity",),
    "saes": ("saes",),
    "features": ("features",),
}
PARALLEL_STEPS = ("finetune", "activations")  # steps whose work is shared out among processes
PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "scikit-learn", "pandas", "numpy", "streamlit", "plotly")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "layerscope": __version__}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _distributed() -> bool:
    """True under a multi-process launch; joins (or creates) the process group first.

    The group is made here rather than by the first parallel step so that the ranks can wait
    for rank 0's single-process steps (e.g. ``data`` ahead of ``finetune`` in a ``build``);
    the timeout is long because they may wait through a whole SAE step.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(timeout=timedelta(hours=12))
    return True


def _sync() -> None:
    """Every process waits here for the others (a no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def end_distributed() -> None:
    """Tear the process group down before exit: a gloo group left alive can abort the process
    at interpreter exit ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def resolve_run_config(run: RunFolder, preset: str | None, config_file: str | None, overrides: dict) -> RunConfig:
    """Saved config of an existing run (if any) + preset + file + overrides."""
    base = run.manifest()["config"] if run.exists() else None
    if base is not None and preset:
        base = None  # an explicit preset restarts from the defaults
    return load_config(preset=preset, config_file=config_file, overrides=overrides, base=base, base_source=str(run.manifest_path))


def _step_fn(step: str) -> Callable[[RunFolder, RunConfig, bool], dict]:
    """fn(run, cfg, redo): ``redo`` asks a step that resumes piecewise (saes) to start afresh."""
    from core import activations, data, features_step, finetune, saes, similarity

    return {
        "data": lambda r, c, redo: data.run_data(r, c.data),
        "finetune": lambda r, c, redo: finetune.run_finetune(r, c.finetune, c.model),
        "activations": lambda r, c, redo: activations.run_activations(r, c.activations, c.model),
        "similarity": lambda r, c, redo: similarity.run_similarity(r, c.similarity),
        "saes": lambda r, c, redo: saes.run_saes(r, c.saes, c.model, resume=not redo),
        "features": lambda r, c, redo: features_step.run_features(r, c.features),
    }[step]


def run_step(run: RunFolder, step: str, cfg: RunConfig, *, force: bool = False, redo: bool = False, log=print) -> str:
    """Run one step unless it is done with the same settings. Returns 'done' or 'skipped'.

    ``force`` rebuilds a step whose settings changed; ``redo`` rebuilds it even when they did not.
    """
    if step not in STEPS:
        raise LayerscopeError(f"unknown step '{step}'; steps are: {', '.join(STEPS)}")
    cfg.validate()  # a RunConfig built in code has not been through load_config's checks
    distributed = _distributed()
    previous = STEPS[STEPS.index(step) - 1] if STEPS.index(step) > 0 else None
    if previous:
        run.require(previous, step)  # before anything is created: a refused step leaves no run behind
        _refuse_changes_to_finished_steps(run, step, cfg)
    created = not run.exists()
    found = _file_state(run) if created and run.root.is_dir() else None  # a folder of the user's files that --force builds in
    if created and is_main_process():
        run.init_manifest(cfg.to_dict(), package_versions(), over_files=force or redo)
    _sync()  # the other ranks read the manifest rank 0 may just have made
    config_hash = cfg.section_hash(*STEP_SECTIONS[step])
    record = run.step_record(step)
    if record and not redo:
        if record.get("config_hash") == config_hash:
            if step in run.stale_steps():
                log(f"[{step}] already done in {run.root}, by an earlier version of its method than this Layerscope's: `{core_command('build', run.root, '--from', step)}` redoes it")
            else:
                log(f"[{step}] already done in {run.root} (pass --force to redo it)")
            return "skipped"
        if not force:
            raise LayerscopeError(
                f"step '{step}' was built with other settings than the ones asked now{_changes(run, step, cfg, record)}; rebuild it and the later steps "
                f"with `{core_command('build', run.root, '--from', step)}` and the same options (or that step alone with --force), or drop the changed options"
            )
    if distributed and step not in PARALLEL_STEPS and not is_main_process():
        _sync()  # rank 0 runs this step alone
        return "done"
    snapshot = None
    if is_main_process():
        snapshot = run.manifest(), _file_state(run)
        run.forget_steps(step)  # redone (or first) from here on: an interrupted redo leaves it not done
    log(f"[{step}] running in {run.root} ...")
    release_free_memory()  # what earlier steps freed goes back to the system, so it is not counted here
    per_step = reset_peak_rss()  # else the peak covers the process so far
    t0 = time.perf_counter()
    try:
        result = _step_fn(step)(run, cfg, redo)
    except LayerscopeError:
        if created and is_main_process():
            _drop_empty_run(run, found)  # e.g. an unknown dataset: leave no run folder that holds nothing
        elif snapshot and _file_state(run) == snapshot[1]:
            run.write_manifest(snapshot[0])  # refused before it wrote anything: the run is as it was
        raise
    seconds = time.perf_counter() - t0
    peak = {"peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_scope": "step" if per_step else "process"}
    if is_main_process():
        m = run.manifest()
        m["config"] = cfg.to_dict()
        m["packages"] = package_versions()
        run.write_manifest(m)
        run.record_step(step, {"config_hash": config_hash, "seconds": round(seconds, 2), **peak, "result": result, "threads": torch.get_num_threads()})
        log(f"[{step}] finished in {seconds:.1f} s (peak memory {peak['peak_rss_mb']:,.0f} MB)")
    _sync()
    return "done"


def _refuse_changes_to_finished_steps(run: RunFolder, step: str, cfg: RunConfig) -> None:
    """Options that change the settings of a step before ``step`` (``features --set
    model.max_length=256`` on a run built at 128) are refused: that step's files were made with the saved settings, and
    recording the new ones as the run's config would misdescribe them (``analyze`` would tokenise
    with them, and ``build`` would then refuse the run for a change nobody asks it to make)."""
    for earlier in STEPS[: STEPS.index(step)]:
        record = run.step_record(earlier)
        if record and record.get("config_hash") != cfg.section_hash(*STEP_SECTIONS[earlier]):
            saved = load_config(base=run.manifest()["config"], base_source=str(run.manifest_path))
            changed = _described_changes(saved, cfg, STEP_SECTIONS[earlier])
            rebuild = f"rebuild from there with `{core_command('build', run.root, '--from', earlier)}`"
            if not changed:  # the saved settings themselves (an older version recorded a later step's --set for the whole run)
                raise LayerscopeError(
                    f"this run's saved settings are not those its '{earlier}' step was built with; {rebuild} (nothing was changed)"
                )
            raise LayerscopeError(
                f"{', '.join(changed)} would change the settings this run's '{earlier}' step was built with; "
                f"{rebuild} and the same options, or drop them to run '{step}' alone (nothing was changed)"
            )


def _changes(run: RunFolder, step: str, cfg: RunConfig, record: dict) -> str:
    """Which options differ from those ``step`` was built with, as ``" (saes.k 32 -> 4)"``, when the
    run's saved config is known to hold those (its hash is the step's); "" otherwise."""
    try:
        saved = load_config(base=run.manifest()["config"], base_source=str(run.manifest_path))
    except (LayerscopeError, KeyError, TypeError):  # a config edited by hand: say less rather than guess
        return ""
    if saved.section_hash(*STEP_SECTIONS[step]) != record.get("config_hash"):
        return ""
    changed = _described_changes(saved, cfg, STEP_SECTIONS[step])
    return f" ({'; '.join(changed)})" if changed else ""


def _described_changes(saved: RunConfig, cfg: RunConfig, sections: tuple[str, ...]) -> list[str]:
    """``changed_fields`` with both values; a dataset path that names the run's own file spelt
    otherwise (``./x.csv`` for ``x.csv``: the data step's settings hold the path as typed) says so."""
    changed = changed_fields(saved, cfg, sections, values=True)
    before, now = saved.data.dataset, cfg.data.dataset
    try:
        same = before != now and user_path(before).is_file() and user_path(before).resolve() == user_path(now).resolve()
    except (LayerscopeError, OSError):
        same = False
    if same:
        changed = [f"{c} (the same file, spelt otherwise: pass it as {shlex.quote(before)})" if c.startswith("data.dataset ") else c for c in changed]
    return changed


def _file_state(run: RunFolder) -> dict:
    """{path: (mtime, size)} of every file of the run but its manifest: did a step write anything?"""
    return {p: (st.st_mtime_ns, st.st_size) for p in run.root.rglob("*") if p != run.manifest_path and p.is_file() for st in [p.stat()]}


def _drop_empty_run(run: RunFolder, found: dict | None = None) -> None:
    """Undo a refused first step: remove the run folder this process created if it holds nothing
    but its manifest; in a folder that was already there (``found``: its files then), only the
    manifest, when the step changed none of its files."""
    if found is not None:
        if _file_state(run) == found:
            run.manifest_path.unlink(missing_ok=True)
        return
    files = [p for p in run.root.rglob("*") if p.is_file()]
    if files == [run.manifest_path]:
        shutil.rmtree(run.root, ignore_errors=True)


def preflight(run: RunFolder, cfg: RunConfig, redo_from: str | None = None) -> None:
    """Before a build's first step, check the options that depend on the model's shape against its
    ``config.json``: SAE layers, kept train layers and text length. Otherwise a layer that does not
    exist would be found only at the ``activations`` or ``saes`` step, minutes later."""
    from core.activations import check_layers
    from core.models import check_architecture, check_max_length, check_tokenizer, check_weights, load_model_config, load_tokenizer
    from core.saes import check_memory, resolve_layers

    record = run.step_record("finetune") if run.exists() else None
    redo = redo_from is not None and STEPS.index(redo_from) <= STEPS.index("finetune")
    kept_model = record and not redo and record.get("config_hash") == cfg.section_hash(*STEP_SECTIONS["finetune"])
    model_config = load_model_config(str(run.model_dir("finetuned")) if kept_model else cfg.model.base)  # same shape
    if not kept_model:
        check_architecture(model_config, cfg.model.base)
    blocks = model_config.num_hidden_layers
    check_max_length(cfg.model.max_length, model_config, cfg.model.base)
    if not kept_model:  # the model to fine-tune: a folder without its tokenizer files reads every word as [UNK]
        check_tokenizer(load_tokenizer(cfg.model.base), model_config, cfg.model.base)
        check_weights(cfg.model.base)
    kept = check_layers(cfg.activations.train_layers, blocks + 1)
    missing = sorted(set(resolve_layers(cfg.saes, blocks)) - set(kept))
    if missing:
        raise LayerscopeError(f"saes.layers asks for hidden states {missing}, which activations.train_layers={cfg.activations.train_layers} does not keep; add them there or drop them from saes.layers")
    if cfg.similarity.split == "train" and cfg.activations.train_layers and kept != list(range(blocks + 1)):
        raise LayerscopeError(
            f"similarity.split=train compares every hidden state, but activations.train_layers={cfg.activations.train_layers} "
            "keeps only those in the train split; use similarity.split=test (the default) or leave activations.train_layers empty (all)"
        )
    d_sae = cfg.saes.d_sae or cfg.saes.expansion_factor * model_config.hidden_size
    if cfg.saes.architecture == "topk" and cfg.saes.k > d_sae:
        raise LayerscopeError(
            f"saes.k={cfg.saes.k} is larger than the dictionary ({d_sae} latents = "
            + ("saes.d_sae" if cfg.saes.d_sae else f"saes.expansion_factor {cfg.saes.expansion_factor} x hidden size {model_config.hidden_size}")
            + "); lower saes.k (--sae-k) or widen the dictionary"
        )
    check_memory(cfg.saes, model_config.hidden_size)


def build(run: RunFolder, cfg: RunConfig, *, force: bool = False, redo_from: str | None = None, until: str | None = None, log=print) -> dict:
    """Run every step in order, skipping finished ones. Returns seconds per step run now.

    ``force`` rebuilds steps whose settings changed; ``redo_from`` rebuilds from that step on.
    """
    timings = {}
    last = STEPS.index(until) if until else len(STEPS) - 1
    first_redo = STEPS.index(redo_from) if redo_from else len(STEPS)
    if redo_from and first_redo > last:
        raise LayerscopeError(f"--from {redo_from} comes after --until {until}, so the build would redo nothing; pass --until {redo_from} or a later step, or drop --until")
    if last >= STEPS.index("finetune"):
        preflight(run, cfg, redo_from)
    for i, step in enumerate(STEPS[: last + 1]):
        t0 = time.perf_counter()
        if run_step(run, step, cfg, force=force, redo=i >= first_redo, log=log) == "done":
            timings[step] = round(time.perf_counter() - t0, 1)
    return timings


def describe_config(cfg: RunConfig) -> str:
    """One ``section.field = value`` line per option, nested sections spelt out (``saes.training.lr``),
    so every line names an option ``--set`` takes."""

    def lines(prefix: str, obj) -> list[str]:
        out = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out += lines(f"{prefix}{f.name}.", value) if dataclasses.is_dataclass(value) else [f"{prefix}{f.name} = {value!r}"]
        return out

    return "\n".join(lines("", cfg))


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `python -m core`")
