"""The run folder: the only module that knows file names inside a run.

    <run>/
      manifest.json                 format version, resolved config, per-step records
      data/{train,val,test}.csv     columns id,text,label (cleaned text; id traces back to the source row)
      data/labels.json              {"names": [...]}
      models/pretrained/            save_pretrained folder: base model + freshly initialised (seeded) head
      models/finetuned/             save_pretrained folder: the fine-tuned classifier
      finetune/trainer/             the transformers Trainer's output_dir (empty: no checkpoints are saved)
      finetune/metrics.json         accuracy, macro-F1, per-class report for both models
      activations/<split>/index.json
      activations/<split>/tokens_00000.safetensors       example_ids, token_ids, positions, special
      activations/<split>/<model>_00000.safetensors      layer_0 .. layer_L  [tokens, d_model]
      similarity/similarity.json + similarity.csv + cka_matrix.csv
      saes/<model>/layer_<i>/{cfg.json, sae_weights.safetensors, metrics.json}
      features/<model>/layer_<i>/stats.safetensors      per-feature statistics, top examples, histograms
      features/matching/layer_<i>.json

Every write goes through ``core.files`` (a temporary name in the same folder, renamed into
place), so an interrupted step never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shlex
from pathlib import Path

from core.errors import LayerscopeError, user_path
from core.files import NUMBER, field_problem, make_folder, refuse_unreadable, write_json

FORMAT_VERSION = 1
MODELS = ("pretrained", "finetuned")
MODEL_NAMES = {"pretrained": "pre-trained", "finetuned": "fine-tuned"}  # in messages and figures
OTHER_MODEL = {"pretrained": "finetuned", "finetuned": "pretrained"}
SPLITS = ("train", "val", "test")
STEPS = ("data", "finetune", "activations", "similarity", "saes", "features")
# The version of the method each step's code implements, recorded with the step. Bump a step's
# number when a change to its code changes what it writes for the same settings: runs built
# before are then named as built by an earlier method (report, build, the dashboard), with the
# command that redoes them, instead of showing old figures as this code's.
STEP_METHODS = {step: 1 for step in STEPS}


# ---------------------------------------------------------------- reading what a step wrote
# The step that writes each top-level folder of a run (the layout below, in RunFolder).
_FOLDER_STEP = {"data": "data", "models": "finetune", "finetune": "finetune", "activations": "activations", "similarity": "similarity", "saes": "saes", "features": "features"}


def core_command(verb: str, run, *options: str) -> str:
    """``python -m core VERB --run RUN OPTIONS`` with the run path shell-quoted, so that a command
    an error message suggests can be pasted as it is (a path with spaces, quotes or ``<>``)."""
    return " ".join(["python -m core", verb, "--run", shlex.quote(str(run)), *options])


def redo_hint(path: Path, otherwise: str = "redo the step that writes it with --force (see `python -m core --help`)") -> str:
    """How to rewrite ``path``: the command that redoes the step writing it, when ``path`` lies in
    a run; ``otherwise`` when it does not."""
    path = Path(path).absolute()
    for root in path.parents:
        if (root / "manifest.json").is_file():
            step = _FOLDER_STEP.get(path.relative_to(root).parts[0])
            if step:
                return f"redo the step that writes it: `{core_command(step, root, '--force')}`"
            break
    return otherwise


def read_json(path: Path, fields: dict | None = None) -> dict:
    """A JSON object a step wrote; LayerscopeError naming the step to redo when it is missing,
    damaged, or lacks one of ``fields`` (a shape such as ``LABELS_FIELDS``, see ``field_problem``)."""
    refuse_unreadable(path)
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayerscopeError(f"{path} is missing; {redo_hint(path)}") from None
    except IsADirectoryError:
        raise LayerscopeError(f"{path} is a folder, not the file a build writes; move it away, then {redo_hint(path)}") from None
    except NotADirectoryError:  # a folder of the run replaced by a file
        raise LayerscopeError(f"{path} cannot be read: a file stands where one of its folders should be; move it away, then {redo_hint(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LayerscopeError(f"{path} is not valid JSON (damaged?); {redo_hint(path)}") from None
    if not isinstance(obj, dict):
        raise LayerscopeError(f"{path} is damaged (a JSON {type(obj).__name__}, not the object a build writes); {redo_hint(path)}")
    problem = field_problem(obj, fields or {})
    if problem:
        raise LayerscopeError(f"{path} is damaged ({problem}); {redo_hint(path)}")
    return obj


def read_similarity(path: Path) -> dict:
    """similarity.json (``SIMILARITY_FIELDS``), also checked for what the shapes cannot say: every
    hidden state 0..L in order, at least the embedding output and one layer, and an
    (L+1) x (L+1) CKA matrix; LayerscopeError naming the step to redo otherwise."""
    sim = read_json(path, SIMILARITY_FIELDS)
    layers = [r["layer"] for r in sim["layers"]]
    n = len(layers)
    problem = None
    if n < 2:
        problem = f"'layers' holds {n} hidden state{'s' * (n != 1)}; a model has at least two (the embedding output and one layer)"
    elif layers != list(range(n)):
        problem = f"'layers' lists hidden states {layers}, not 0 to {n - 1} in order"
    elif len(sim["cka_matrix"]) != n or any(len(row) != n for row in sim["cka_matrix"]):
        problem = f"'cka_matrix' is not {n} x {n}, one row and column per hidden state"
    if problem:
        raise LayerscopeError(f"{path} is damaged ({problem}); {redo_hint(path)}")
    return sim


# ---------------------------------------------------------------- what the run's JSON files hold
# The fields a reader relies on, so that a file edited by hand or written by another program gets
# one message naming it instead of a KeyError deep inside a reader (the shape language is
# ``core.files.field_problem``'s). Writers may add fields; readers ``.get`` the rest.
LABELS_FIELDS = {"names": [str]}
CLASS_SCORES = {"precision": NUMBER, "recall": NUMBER, "f1-score": NUMBER, "support": NUMBER}
CLASSIFIER_METRICS = {"accuracy": NUMBER, "macro_f1": NUMBER, "per_class": {"*": CLASS_SCORES}}
FINETUNE_METRICS_FIELDS = {"pretrained": CLASSIFIER_METRICS, "finetuned": CLASSIFIER_METRICS, "test_examples": int, "train_examples": int, "train_seconds": NUMBER}
ACTIVATION_INDEX_FIELDS = {"num_shards": int, "num_tokens": int, "num_examples": int, "num_hidden_states": int, "d_model": int, "layers?": [int], "shard_tokens?": [int]}
SIMILARITY_FIELDS = {
    "layers": [{"layer": int, "cosine_of_means": NUMBER, "mean_cosine": NUMBER, "token_cosine": NUMBER, "cka": NUMBER}],
    "cka_matrix": [[NUMBER]],
    "num_tokens": int,
}
SAE_METRICS_FIELDS = {
    "model": str, "layer": int, "architecture": str, "d_sae": int, "k?": (int, type(None)), "num_tokens?": int,
    "l0": NUMBER, "fvu": NUMBER, "mse": NUMBER, "dead_fraction": NUMBER, "dense_fraction": NUMBER,
    "accuracy_spliced?": NUMBER, "kl_spliced?": NUMBER, "accuracy_original?": NUMBER, "splice_texts?": int, "spliced_into?": str,
    "fvu_on_finetuned?": NUMBER,
    "rare_tokens?": ({"token_share": NUMBER, "error_share": NUMBER, "fvu": NUMBER, "fvu_rest": NUMBER, "seen_fewer_than?": int}, type(None)),
    "training?": {"num_steps?": int, "num_tokens?": int, "tokens_per_second?": NUMBER, "dead_fraction?": NUMBER, "lr?": NUMBER, "normalization_scale?": NUMBER},
    "loss_curve?": {"step": [NUMBER], "mse": [NUMBER], "l0": [NUMBER]},
}
NO_SIMILARITY = -2.0  # matching files: a feature whose partner similarity is NaN (JSON has no NaN; cosines are >= -1)


def match_similarity(value: float) -> float | None:
    """A similarity as a matching file stores it; None for ``NO_SIMILARITY``."""
    return None if value < -1 else value


MATCHING_FIELDS = {
    "layer": int, "kept": NUMBER, "shifted": NUMBER, "new": NUMBER, "lost": NUMBER, "counts": {},
    **{f"{what}_of_{model}": [kind] for what, kind in (("partner", int), ("similarity", NUMBER), ("status", str)) for model in MODELS},
}
# manifest.json: the resolved config and one record per finished step (its "result" is what the
# step's entry function returned; the report reads those of data, activations and features).
_STEP_RECORD = {"finished": str, "seconds?": NUMBER, "peak_rss_mb?": NUMBER, "method?": int, "result": {}}
_MATCHING_SUMMARY = {  # one layer of the features step's matching (report "matching", the overview's bars)
    "layer": int, "kept": NUMBER, "shifted": NUMBER, "new": NUMBER, "lost": NUMBER, "counts": {"*": int},
    "kept_threshold": NUMBER, "shifted_threshold": NUMBER, **{f"baseline_{k}?": NUMBER for k in ("kept", "shifted", "new", "lost")},
}
MANIFEST_FIELDS = {
    "config": {},
    "steps?": {
        "data?": {**_STEP_RECORD, "result": {"labels": [str], "rows": {"*": int}, "hashes?": {"*": str}}},
        "activations?": {**_STEP_RECORD, "result": {"*": {"tokens": int, "examples": int}}},
        "features?": {**_STEP_RECORD, "result": {"matching?": [_MATCHING_SUMMARY]}},
        **{f"{step}?": _STEP_RECORD for step in ("finetune", "similarity", "saes")},
    },
}


# ---------------------------------------------------------------- the run folder
# Names of files that steps write inside a folder they fill atomically (a temporary folder renamed
# into place), so they need the bare name rather than a RunFolder path.
MANIFEST_FILE = "manifest.json"
SIMILARITY_JSON, SIMILARITY_CSV, CKA_CSV = "similarity.json", "similarity.csv", "cka_matrix.csv"
SAE_CFG_FILE, SAE_WEIGHTS_FILE, SAE_METRICS_FILE = "cfg.json", "sae_weights.safetensors", "metrics.json"  # the SAELens layout, + metrics
FEATURE_STATS_FILE = "stats.safetensors"


class RunFolder:
    """Paths and manifest of one run. Creating the object touches nothing on disk."""

    def __init__(self, root: str | Path):
        self.root = user_path(root)

    def refuse_file(self) -> None:
        """LayerscopeError when the path is a file: every verb needs a folder there (or nothing yet)."""
        if self.root.exists() and not self.root.is_dir():
            raise LayerscopeError(f"{self.root} is a file, not a run folder; pass a folder (a new one, or one built by `python -m core build`)")

    def __eq__(self, other) -> bool:
        return isinstance(other, RunFolder) and self.root.resolve() == other.root.resolve()

    def __hash__(self) -> int:
        return hash(str(self.root.resolve()))

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # -- paths ----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    def split_csv(self, split: str) -> Path:
        return self.root / "data" / f"{split}.csv"

    @property
    def labels_path(self) -> Path:
        return self.root / "data" / "labels.json"

    def model_dir(self, model: str) -> Path:
        assert model in MODELS, model
        return self.root / "models" / model

    def model_config_path(self, model: str) -> Path:
        return self.model_dir(model) / "config.json"  # written by save_pretrained

    @property
    def finetune_metrics_path(self) -> Path:
        return self.root / "finetune" / "metrics.json"

    @property
    def trainer_dir(self) -> Path:
        return self.root / "finetune" / "trainer"

    def activations_root(self) -> Path:
        return self.root / "activations"

    def activations_dir(self, split: str) -> Path:
        return self.activations_root() / split

    def activation_index(self, split: str) -> Path:
        return self.activations_dir(split) / "index.json"

    def token_shard(self, split: str, i: int) -> Path:
        return self.activations_dir(split) / f"tokens_{i:05d}.safetensors"

    def hidden_shard(self, split: str, model: str, i: int) -> Path:
        return self.activations_dir(split) / f"{model}_{i:05d}.safetensors"

    @property
    def similarity_dir(self) -> Path:
        return self.root / "similarity"

    @property
    def similarity_json(self) -> Path:
        return self.similarity_dir / SIMILARITY_JSON

    def sae_dir(self, model: str, layer: int) -> Path:
        return self.root / "saes" / model / f"layer_{layer}"

    def sae_metrics_path(self, model: str, layer: int) -> Path:
        return self.sae_dir(model, layer) / SAE_METRICS_FILE

    def sae_dirs(self) -> list[tuple[str, int, Path]]:
        """Every trained SAE as (model, layer, folder), in a stable order."""
        out = []
        for model in MODELS:
            base = self.root / "saes" / model
            if base.is_dir():
                # a folder this user may not list or enter would look empty: SAEs "missing", and
                # the fix offered would be to train them again rather than to change a permission
                for d in (base, *sorted(p for p in base.glob("layer_*") if p.is_dir())):
                    if not os.access(d, os.R_OK | os.X_OK):
                        raise LayerscopeError(f"cannot read the SAE folder {d}: permission denied; give your user access to it (`chmod -R u+rX {shlex.quote(str(d))}`), or run as its owner")
                for d in base.glob("layer_*"):
                    if (d / SAE_CFG_FILE).is_file() and d.name[6:].isdigit():
                        out.append((model, int(d.name[6:]), d))
        return sorted(out, key=lambda t: (MODELS.index(t[0]), t[1]))

    def features_dir(self, model: str, layer: int) -> Path:
        return self.root / "features" / model / f"layer_{layer}"

    def feature_stats_path(self, model: str, layer: int) -> Path:
        return self.features_dir(model, layer) / FEATURE_STATS_FILE

    def matching_path(self, layer: int) -> Path:
        return self.root / "features" / "matching" / f"layer_{layer}.json"

    def stamp(self) -> int:
        """A number that changes whenever a file a reader of the run uses changes (appears, goes,
        or gets a new size, modification time or status change time, as a chmod gives): every file
        except the activation shards and the Trainer's output folder, which only the steps read,
        and hidden files (the temporary names of writes in progress, an editor's swap file).
        Caches keyed by it see a step's rewrite and a file edited, damaged or made readable by hand
        alike. 0 when the folder cannot be read."""
        skip = {self.activations_root(), self.trainer_dir}
        seen = []
        for folder, subfolders, files in os.walk(self.root):  # ~70 files in a run: about 0.5 ms
            subfolders[:] = sorted(d for d in subfolders if Path(folder, d) not in skip and not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                with contextlib.suppress(OSError):  # gone meanwhile
                    st = os.stat(os.path.join(folder, name))
                    seen.append(f"{folder}/{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
        digest = hashlib.blake2b("\n".join(seen).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") if seen else 0

    # -- one writer at a time -----------------------------------------------------
    @contextlib.contextmanager
    def writing(self):
        """Hold the run folder for this process while it builds or runs a step: a second process
        that tries (another terminal, a second dashboard) gets a LayerscopeError instead of
        interleaving its steps and losing the first one's manifest records. The lock is flock(2) on
        the folder itself, so no lock file is left behind and it ends with the process, however it
        ends; where the file system cannot lock (some network mounts), the work goes on unlocked.
        A folder made here and still empty at the end (a refused first step) is removed again, by
        the process that held it only, and only while it is the very folder it held."""
        self.refuse_file()
        made = [p for p in (self.root, *self.root.parents) if not p.exists()]  # deepest first
        make_folder(self.root)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                made = []  # the holder's folder, not ours to tidy
                raise LayerscopeError(
                    f"another process is building in {self.root} (a build or a step started elsewhere); "
                    "wait for it to finish, or pass another --run folder (nothing was changed)"
                ) from None
            except OSError:
                pass  # this file system has no locks
            yield self
        finally:
            held = os.fstat(fd)
            os.close(fd)
            with contextlib.suppress(OSError):
                now = os.stat(self.root)
                if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                    made = []  # removed and made again meanwhile (a refused first step's clean-up): another process's
            for p in made:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only succeeds when empty

    def held_elsewhere(self) -> bool:
        """True while another process holds this folder through ``writing`` (a build running)."""
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return False  # no folder (yet), or one we cannot open: nobody builds in it from here
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False  # free (closing the descriptor lets go again)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    # -- manifest ---------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        try:
            self.refuse_file()
            is_dir = self.root.is_dir()
        except OSError as e:  # a name too long, a parent folder we may not enter
            raise LayerscopeError(f"cannot open the run folder {self.root} ({e.strerror}); pass a run folder you can read") from None
        if not is_dir:
            raise LayerscopeError(f"run folder {self.root} does not exist; build it with `{core_command('build', self.root)}`")
        if not self.manifest_path.is_file():
            raise LayerscopeError(
                f"{self.root} is not a Layerscope run (no manifest.json); pass a run folder built by "
                f"`python -m core build`, or build one there"
            )
        try:
            m = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            m = None
        if isinstance(m, dict) and not {"format_version", "config", "steps"} & set(m):  # another tool's (a web extension's, a package's)
            raise LayerscopeError(
                f"{self.root} is not a Layerscope run (its manifest.json holds none of format_version, config and steps, so another "
                f"program wrote it); pass a run folder built by `python -m core build`, or a new folder to build one"
            )
        problem = "not the JSON object a build writes" if not isinstance(m, dict) else field_problem(m, MANIFEST_FIELDS)
        if problem:
            raise LayerscopeError(
                f"{self.manifest_path} is damaged ({problem}); build the run again into a new "
                f"folder (`python -m core build --run NEW_DIR`), or delete that manifest.json and run `{core_command('build', self.root, '--force')}` to redo every step in place"
            )
        version = m.get("format_version")
        if version != FORMAT_VERSION:
            if "format_version" not in m:
                written = "with no format_version"
            elif isinstance(version, int) and not isinstance(version, bool):
                written = f"in run format {version}"
            else:  # "1", 1.0, null: no format number, whatever it looks like
                written = f"with format_version {json.dumps(version)}, not a format number"
            raise LayerscopeError(
                f"run {self.root} was written {written}, this Layerscope reads format {FORMAT_VERSION}; "
                f"rebuild it into a new folder with `python -m core build --run NEW_DIR` (the old folder is left untouched)"
            )
        return m

    def write_manifest(self, m: dict) -> None:
        write_json(self.manifest_path, m)

    def init_manifest(self, config: dict, versions: dict, over_files: bool = False) -> dict:
        """Start a new run (``over_files``: even in a folder that holds files, e.g. a run whose
        damaged manifest.json was deleted; files of the same names are replaced)."""
        m = {
            "format_version": FORMAT_VERSION,
            "created": now(),
            "config": config,
            "packages": versions,
            "steps": {},
        }
        self.refuse_file()
        if not over_files and self.root.is_dir() and any(self.root.iterdir()):  # a new run must not write over someone's files
            raise LayerscopeError(
                f"{self.root} holds files but no manifest.json, so it is not a Layerscope run; pass a new or empty "
                "folder for a new run, or add --force to build one there, replacing files of the same names (nothing was changed)"
            )
        make_folder(self.root)
        self.write_manifest(m)
        return m

    def step_record(self, step: str) -> dict | None:
        if not self.exists():
            return None
        return self.manifest().get("steps", {}).get(step)

    def is_done(self, step: str) -> bool:
        return self.step_record(step) is not None

    def require(self, step: str, for_step: str) -> None:
        """Raise a clear error when ``step`` has not run yet; ``for_step`` is the step (or the
        command or reader, e.g. "the feature browser") that needs it."""
        self.refuse_file()
        if not self.exists() and self.root.is_dir() and any(self.root.iterdir()):  # someone's folder, or a run's subfolder
            self.manifest()  # "is not a Layerscope run (no manifest.json)": building here would be the wrong fix
        if not self.exists() or not self.is_done(step):
            who = f"step '{for_step}'" if for_step in STEPS else for_step
            raise LayerscopeError(
                f"{who} needs step '{step}', which has not run in {self.root}; "
                f"run `{core_command('build', self.root, '--until', step)}` first"
            )

    def forget_steps(self, step: str) -> None:
        """Mark ``step`` and every later step not done (before a forced redo: if it stops half-way,
        the manifest must not vouch for a mix of old and new files)."""
        m = self.manifest()
        steps = m.get("steps", {})
        gone = [s for s in STEPS[STEPS.index(step) :] if s in steps]
        if gone:
            for s in gone:
                del steps[s]
            self.write_manifest(m)

    def stale_steps(self, manifest: dict | None = None) -> list[str]:
        """Steps done by an earlier version of their method than this code's (``STEP_METHODS``;
        a record without one predates the numbering: version 1). ``manifest``: read already."""
        steps = (manifest if manifest is not None else self.manifest()).get("steps", {})
        return [s for s in STEPS if s in steps and steps[s].get("method", 1) < STEP_METHODS[s]]

    def record_step(self, step: str, record: dict) -> None:
        """Mark a step done, and forget every later step (their inputs just changed)."""
        m = self.manifest()
        steps = m.setdefault("steps", {})
        later = STEPS[STEPS.index(step) + 1 :] if step in STEPS else ()
        for s in later:
            steps.pop(s, None)
        steps[step] = {"finished": now(), "method": STEP_METHODS.get(step, 1), **record}
        self.write_manifest(m)

    def labels(self) -> list[str]:
        names = read_json(self.labels_path, LABELS_FIELDS)["names"]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # two classes under one name: a prediction or a per-class table would merge them
            raise LayerscopeError(f"{self.labels_path} is damaged (the class name {repeated[0]!r} appears more than once); {redo_hint(self.labels_path)}")
        return names


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
