import re

import numpy as np
import pandas as pd
import pytest

from core.data import DataConfig, clean_text, prepare, run_data, stratified_sample
from core.errors import LayerscopeError
from core.runfolder import RunFolder
from tests.conftest import make_dataset


def test_clean_text_each_switch():
    raw = "Great film!<br /><br />The ACTING, though... 10/10 ★"
    assert clean_text(raw, DataConfig()) == "great film the acting though 10 10"
    kept = clean_text(raw, DataConfig(lowercase=False, remove_punctuation=False, remove_special=False))
    assert "<br />" not in kept and "ACTING," in kept and "★" in kept
    assert "<br />" in clean_text(raw, DataConfig(remove_html=False, remove_punctuation=False, remove_special=False))


def _csv(tmp_path, frame, name="d.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def test_split_is_stratified_80_10_10_and_seeded(tmp_path):
    path = _csv(tmp_path, make_dataset(200))
    splits, names = prepare(DataConfig(dataset=path, max_rows=0))
    assert names == ["negative", "positive"]
    sizes = {k: len(v) for k, v in splits.items()}
    n = sum(sizes.values())
    assert sizes["train"] == pytest.approx(0.8 * n, abs=2) and sizes["test"] == pytest.approx(0.1 * n, abs=2)
    for frame in splits.values():  # stratified: both classes in equal share
        assert abs(frame["label"].mean() - 0.5) < 0.1
    ids = [set(f["id"]) for f in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again, _ = prepare(DataConfig(dataset=path, max_rows=0))
    assert again["test"]["id"].tolist() == splits["test"]["id"].tolist()
    other, _ = prepare(DataConfig(dataset=path, max_rows=0, seed=1))
    assert other["test"]["id"].tolist() != splits["test"]["id"].tolist()


def test_cap_keeps_class_balance(tmp_path):
    path = _csv(tmp_path, make_dataset(240))
    splits, _ = prepare(DataConfig(dataset=path, max_rows=100, drop_duplicates=False))
    assert sum(len(f) for f in splits.values()) == 100
    assert pd.concat(splits.values())["label"].value_counts().to_dict() == {0: 50, 1: 50}


def _classes(counts: dict) -> pd.DataFrame:
    return pd.DataFrame([(f"{name} text {i}", name) for name, n in counts.items() for i in range(n)], columns=["text", "label"])


@pytest.mark.parametrize(
    "counts, max_rows, message",
    [
        # 3 rows of 'rare': the held-out 20% gets at most one, and scikit-learn's second split failed
        ({"rare": 3, "common": 997}, 0, r"80%/10%/10% split of 2 classes leaves the validation or test split without a row of class 'rare' \(3 rows\): add rows of that class"),
        # 10 rows of 'rare' at 80/5/15: scikit-learn splits, but gives both held-out rows to test
        ({"rare": 10, "common": 400}, 0, r"80%/5%/15% split of 2 classes leaves the validation split without a row of class 'rare' \(10 rows\)"),
        # one row of 'rare' with a cap: the capping split itself failed
        ({"rare": 1, "common": 300}, 100, r"1 of them in its smallest class \('rare'\)"),
        # 12 rows of 'rare' are enough, but a cap to 100 of 1,012 keeps one of them
        ({"rare": 12, "common": 1000}, 100, r"100 usable rows after the data.max_rows cap, 1 of them .*'rare'.*raise data.max_rows"),
        ({"a": 50, "b": 50}, 1, r"data.max_rows=1 is below the 21 rows a stratified 80%/10%/10% split of 2 classes needs"),
        # a cap above the data's size caps nothing: the message is about the data, not the cap
        ({"a": 10, "b": 8}, 20, r"has 18 usable rows, 8 of them in its smallest class \('b'\); .* needs at least 21 rows and 3 in every class: add rows"),
        # a cap that leaves no row of a class at all
        ({"rare": 5, "common": 1000}, 100, r"100 usable rows after the data.max_rows cap, 0 of them in its smallest class \('rare'\)"),
    ],
)
def test_a_class_too_rare_to_split_is_one_clear_error(tmp_path, counts, max_rows, message):
    fractions = {"val_fraction": 0.05, "test_fraction": 0.15} if counts.get("rare") == 10 else {}
    with pytest.raises(LayerscopeError, match=message):
        prepare(DataConfig(dataset=_csv(tmp_path, _classes(counts)), max_rows=max_rows, **fractions))


@pytest.mark.parametrize("counts, fractions", [({"rare": 8, "common": 1000}, (0.1, 0.1)), ({"rare": 13, "common": 400}, (0.05, 0.15))])
def test_a_rare_class_that_reaches_every_split_is_split(tmp_path, counts, fractions):
    """8 rows at 80/10/10 give validation and test one each (a blanket 10-per-class floor refused
    them); unequal held-out fractions work too."""
    splits, names = prepare(DataConfig(dataset=_csv(tmp_path, _classes(counts)), max_rows=0, val_fraction=fractions[0], test_fraction=fractions[1]))
    rare = names.index("rare")
    per_split = {s: int((f["label"] == rare).sum()) for s, f in splits.items()}
    assert min(per_split.values()) >= 1 and sum(per_split.values()) == counts["rare"], per_split


def test_any_class_sizes_split_with_every_class_in_every_split_or_are_refused(tmp_path):
    """Seeded random class sizes, caps and split fractions: each either splits with every class in
    train, validation and test (and the cap's exact row count) or is refused with a LayerscopeError;
    scikit-learn's ValueError never reaches the user."""
    rng = np.random.default_rng(0)
    outcomes = {"split": 0, "refused": 0}
    for trial in range(120):
        counts = {f"c{i}": int(rng.choice([1, 3, 9, 10, 12, 40, 200])) for i in range(int(rng.integers(2, 5)))}
        total = sum(counts.values())
        max_rows = int(rng.choice([0, 0, 30, 60, total - 1]))
        val, test = [(0.1, 0.1), (0.05, 0.15), (0.25, 0.25)][int(rng.integers(3))]
        cfg = DataConfig(dataset=_csv(tmp_path, _classes(counts)), max_rows=max_rows, val_fraction=val, test_fraction=test, seed=trial)
        try:
            splits, names = prepare(cfg)
        except LayerscopeError:
            outcomes["refused"] += 1
            continue
        outcomes["split"] += 1
        for split, frame in splits.items():
            assert set(frame["label"]) == set(range(len(counts))), (trial, split, counts, max_rows)
        assert sum(len(f) for f in splits.values()) == (min(max_rows, total) if max_rows else total)
    assert outcomes["split"] >= 20 and outcomes["refused"] >= 20, outcomes  # both branches are exercised


def test_imdb_builtin_source():
    splits, names = prepare(DataConfig(dataset="imdb", max_rows=500))
    assert names == ["negative", "positive"]
    text = " ".join(splits["train"]["text"])
    assert "<br" not in text and text == text.lower() and "," not in text
    assert sum(len(f) for f in splits.values()) == 500


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"review": ["a b"] * 30, "label": [0, 1] * 15}), "no column 'text'"),
        (pd.DataFrame({"text": [f"t {i}" for i in range(30)], "label": [0, 1, None] * 10}), "empty or NaN label"),
        (pd.DataFrame({"text": [f"t {i}" for i in range(30)], "label": [1] * 30}), "only one class"),
        (pd.DataFrame({"text": ["...", "!!"] * 15, "label": [0, 1] * 15}), r"no row with text after cleaning \(each of its 30 texts is empty or only punctuation\)"),
        (pd.DataFrame({"text": [], "label": []}), "has no rows; check the file"),
        (pd.DataFrame({"text": [f"t {i}" for i in range(8)], "label": [0, 1] * 4}), "needs at least"),
    ],
)
def test_bad_csv_gives_one_clear_error(tmp_path, frame, message):
    with pytest.raises(LayerscopeError, match=message):
        prepare(DataConfig(dataset=_csv(tmp_path, frame)))


def test_rows_with_an_empty_text_cell_are_dropped(tmp_path):
    frame = make_dataset(200)
    frame.loc[[3, 17], "text"] = None  # a blank cell reads back as NaN
    splits, _ = prepare(DataConfig(dataset=_csv(tmp_path, frame), max_rows=0, drop_duplicates=False))
    kept = pd.concat(splits.values())
    assert len(kept) == 198 and not ({3, 17} & set(kept["id"])) and "nan" not in set(kept["text"])


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9 ok,1\n".encode("latin-1"))
    with pytest.raises(LayerscopeError, match="not UTF-8"):
        prepare(DataConfig(dataset=str(path)))


def test_unknown_dataset():
    with pytest.raises(LayerscopeError, match="unknown dataset 'imbd'"):
        prepare(DataConfig(dataset="imbd"))


def test_run_data_writes_splits_atomically(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.init_manifest({}, {})
    record = run_data(run, DataConfig(dataset=_csv(tmp_path, make_dataset(100)), max_rows=0))
    assert set(record["rows"]) == {"train", "val", "test"}
    assert run.labels() == ["negative", "positive"]
    assert not list(run.root.rglob("*.tmp"))


@pytest.mark.parametrize("name, classes", [("bbc_news", 5), ("clothing_reviews", 5), ("rotten_tomatoes", 2)])
def test_other_builtin_sources(name, classes):
    splits, names = prepare(DataConfig(dataset=name, max_rows=300))
    assert len(names) == classes
    assert sum(len(f) for f in splits.values()) == 300
    assert splits["train"]["label"].nunique() == classes


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    import os

    from core.files import write_json
    from core.sae import SAEConfig, SparseAutoencoder

    umask = os.umask(0o022)
    os.umask(umask)
    write_json(tmp_path / "a.json", {"x": 1})
    SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, k=2)).save(tmp_path / "sae")
    for path in (tmp_path / "a.json", tmp_path / "sae" / "cfg.json", tmp_path / "sae" / "sae_weights.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path  # mkstemp alone would leave 0o600


def _run_with_data(tmp_path) -> RunFolder:
    path = tmp_path / "data.csv"
    make_dataset(60).to_csv(path, index=False)
    run = RunFolder(tmp_path / "run")
    run.init_manifest({}, {})
    run.record_step("data", {"result": run_data(run, DataConfig(dataset=str(path), max_rows=0))})
    return run


@pytest.mark.parametrize(
    "damage",
    [lambda b: b"", lambda b: b[: len(b) // 2], lambda b: b"id,text,label\n", lambda b: b[:-2] + bytes([b[-2] ^ 1]) + b[-1:]],
    ids=["emptied", "truncated", "header only", "last label flipped"],
)
def test_a_split_changed_since_the_data_step_is_refused(tmp_path, damage):
    """The manifest holds each split's hash: any change, even one that still parses, is named."""
    from core.data import load_split

    run = _run_with_data(tmp_path)
    original = load_split(run, "test")
    path = run.split_csv("test")
    good = path.read_bytes()
    path.write_bytes(damage(good))
    assert path.read_bytes() != good
    with pytest.raises(LayerscopeError, match=r"test\.csv has changed since the data step wrote it .* put the original back, or rebuild it with `python -m core build --run .* --from data`"):
        load_split(run, "test")
    path.write_bytes(good)  # the first fix the message gives
    pd.testing.assert_frame_equal(load_split(run, "test"), original)


@pytest.mark.parametrize(
    "content, problem",
    [("", "No columns to parse"), ("id,text,label\n1,a film,\n", "invalid literal"), ("a,b\n1,2\n", "columns ['a', 'b'], not id, text, label")],
)
def test_a_damaged_split_without_a_recorded_hash_is_one_clear_error(tmp_path, content, problem):
    """Runs whose data record has no hashes still get one message, not a pandas traceback."""
    from core.data import load_split

    run = _run_with_data(tmp_path)
    m = run.manifest()
    del m["steps"]["data"]["result"]["hashes"]
    run.write_manifest(m)
    run.split_csv("test").write_text(content)
    with pytest.raises(LayerscopeError, match=rf"test\.csv is damaged \({re.escape(problem)}.*\); rebuild it with"):
        load_split(run, "test")


def test_a_dataset_path_that_is_a_folder_or_a_device_says_so(tmp_path):
    with pytest.raises(LayerscopeError, match="is a folder; pass an existing CSV path"):
        prepare(DataConfig(dataset=str(tmp_path)))
    with pytest.raises(LayerscopeError, match="is not a regular file; pass an existing CSV path"):
        prepare(DataConfig(dataset="/dev/null"))
    with pytest.raises(LayerscopeError, match="not found; pass an existing CSV path"):
        prepare(DataConfig(dataset=str(tmp_path / "gone.csv")))


def test_named_columns_and_duplicates_after_cleaning(tmp_path):
    """data.text_column / data.label_column pick the columns; texts equal after cleaning (case,
    HTML) count once, so no text sits in two splits (a train/test leak otherwise)."""
    base = [(f"review number {i} was {'great' if i % 2 else 'dull'}", "pos" if i % 2 else "neg") for i in range(60)]
    variants = [(t.upper(), y) for t, y in base[:20]] + [(f"<b>{t}</b>", y) for t, y in base[20:30]]
    frame = pd.DataFrame(base + variants + [("", "pos")], columns=["review", "sentiment"]).sample(frac=1, random_state=0)
    cfg = DataConfig(dataset=_csv(tmp_path, frame), max_rows=0, text_column="review", label_column="sentiment")
    splits, names = prepare(cfg)
    assert names == ["neg", "pos"]
    texts = [t for f in splits.values() for t in f["text"]]
    assert len(texts) == len(set(texts)) == len({clean_text(t, cfg) for t, _ in base})  # 60: the 30 variants dropped
    label_of = {clean_text(t, cfg): names.index(y) for t, y in base}
    assert all(label_of[t] == y for f in splits.values() for t, y in zip(f["text"], f["label"]))
    kept, _ = prepare(DataConfig(dataset=cfg.dataset, max_rows=0, text_column="review", label_column="sentiment", drop_duplicates=False))
    assert sum(len(f) for f in kept.values()) == 90  # 60 + 30 variants; the empty text is always dropped


@pytest.mark.parametrize("sizes, n", [((300, 300), 64), ((51, 37, 41, 50, 34), 64), ((332, 130, 75, 41, 22), 7), ((5, 1), 3)])
def test_a_stratified_sample_takes_every_class_in_proportion(sizes, n):
    """What the logit effects average over: a split stored class by class (as IMDb's is) must not
    give n rows of its first class."""
    labels = np.repeat(np.arange(len(sizes)), sizes)  # class-sorted, like the IMDb package
    frame = pd.DataFrame({"id": np.arange(len(labels)), "text": [f"t{i}" for i in range(len(labels))], "label": labels})
    got = stratified_sample(frame, n, seed=3)
    assert len(got) == n and got["id"].is_monotonic_increasing and got["id"].is_unique
    counts = got["label"].value_counts().reindex(range(len(sizes)), fill_value=0).to_numpy()
    np.testing.assert_allclose(counts, n * np.array(sizes) / len(labels), atol=1)
    pd.testing.assert_frame_equal(got, stratified_sample(frame, n, seed=3))  # seeded
    assert len(frame) < 100 or not got.equals(stratified_sample(frame, n, seed=4))  # another seed, other rows
    assert stratified_sample(frame, len(frame)) is frame


def test_labels_that_differ_only_by_surrounding_spaces_are_one_class(tmp_path):
    """" positive" and "positive\r" (a header "text, label", CRLF inside quotes) are the class
    "positive": they made three or four classes of two, silently."""
    df = make_dataset(120)
    df.loc[::3, "label"] = " " + df.loc[::3, "label"]
    df.loc[1::3, "label"] = df.loc[1::3, "label"] + "\r"
    path = tmp_path / "spaced.csv"
    df.to_csv(path, index=False)
    splits, names = prepare(DataConfig(dataset=str(path), max_rows=0))
    assert names == ["negative", "positive"]
    labels = pd.concat(splits.values())["label"]
    assert sorted(labels.unique()) == [0, 1] and labels.value_counts().tolist() == [60, 60]


def test_one_column_for_both_the_text_and_the_label_is_refused(tmp_path):
    with pytest.raises(LayerscopeError, match="data.label_column='text' must be another column than data.text_column .'text'.: one column cannot be both"):
        DataConfig(dataset="x.csv", label_column="text").validate()


def _gzip(path, frame):
    import gzip

    path.write_bytes(gzip.compress(frame.to_csv(index=False).encode()))


def _zip(path, frame):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("sheet.csv", frame.to_csv(index=False))


@pytest.mark.parametrize(
    "write, message",
    [
        (_gzip, "is gzip-compressed, not a CSV text file; decompress it first (`gunzip -c data.csv > unpacked.csv`)"),
        (_zip, "is a zip archive (an .xlsx workbook is one), not a CSV text file; export the sheet as CSV UTF-8"),
        (lambda p, f: p.write_text(f.to_csv(index=False), encoding="utf-16"), "is UTF-16 text, not a CSV text file; re-save it as UTF-8, e.g. `iconv -f utf-16 -t utf-8 data.csv > fixed.csv`"),
        (lambda p, f: f.to_csv(p, index=False, sep=";"), "has its columns separated by semicolons, not commas (one column read: 'text;label'); save it as a comma-separated CSV"),
        (lambda p, f: f.to_csv(p, index=False, sep="\t"), "has its columns separated by tabs, not commas"),
    ],
)
def test_a_file_that_is_not_comma_separated_utf8_text_names_what_it_is(tmp_path, write, message):
    """Each of these got a fix that could not work: "re-save it as UTF-8 with iconv -f latin1"
    for a compressed or UTF-16 file, "name the right columns" for another separator."""
    path = tmp_path / "data.csv"
    write(path, make_dataset(40))
    with pytest.raises(LayerscopeError, match=re.escape(message)):
        prepare(DataConfig(dataset=str(path), max_rows=0))


def test_a_header_with_spaces_after_its_commas_names_the_columns_without_them(tmp_path):
    path = tmp_path / "spaced.csv"
    path.write_text("text, label\n" + "".join(f"{t}, {l}\n" for t, l in make_dataset(120).itertuples(index=False)))
    splits, names = prepare(DataConfig(dataset=str(path), max_rows=0))
    assert names == ["negative", "positive"] and sum(len(s) for s in splits.values()) == 120


def test_a_class_named_none_is_read_as_missing_and_the_message_says_so(tmp_path):
    """pandas reads NA / None / null cells as missing: a class so named gets the missing-label
    message, which names that cause and its fix, and the right CSV lines."""
    path = tmp_path / "classes.csv"
    rows = ["text,label"] + [f"text {i},{['good', 'bad', 'None'][i % 3]}" for i in range(30)]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(LayerscopeError) as e:
        prepare(DataConfig(dataset=str(path)))
    said = str(e.value)
    assert "10 rows have an empty or NaN label (CSV lines 4, 7, 10, 13, 16...;" in said
    assert "takes NA, N/A, NaN, null and None for missing too" in said and "rename a class spelt so" in said
