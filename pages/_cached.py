"""Cached calls into ``core``: the only ``st.cache_data`` / ``st.cache_resource`` wrappers of the
dashboard (the background build's process table aside, ``pages/_background.py``).

Each public function takes a ``RunFolder`` and calls a cached twin keyed by the run's *path* and
its file stamp (``shared.run_stamp``), so a file a step rewrote, or one edited or damaged by hand,
is read again on the next rerun. Models and SAEs are a ``cache_resource`` (one copy per server);
results are ``cache_data`` (a copy per caller). The heavier core modules (``core.analysis``,
``core.features_step``, ``core.export``) are imported on use, so a page loads only what it draws.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import streamlit as st

from core.errors import LayerscopeError
from core.runfolder import RunFolder
from pages import _shared as shared


@st.cache_data(show_spinner=False, max_entries=32)
def _report(path: str, stamp: int) -> dict:
    from core.report import build_report

    return build_report(RunFolder(path), lenient=True)


def report_of_path(path: str) -> dict:
    """``build_report(run, lenient=True)``: a damaged file leaves out the parts that read it (their
    messages in ``problems``, see ``report_problem``). Cached until a file of the run changes
    (``shared.run_stamp``), so a file put right by hand shows on the next rerun."""
    return _report(path, shared.run_stamp(path))


def report(run: RunFolder) -> dict:
    return report_of_path(str(run.root))


def report_problem(rep: dict, part: str) -> None:
    """Raise the message of a report part that could not be read ("finetune", "similarity",
    "saes", ...), for ``shared.guarded`` to show in place of the section that needs that part."""
    problem = rep.get("problems", {}).get(part)
    if problem:
        raise LayerscopeError(problem)


def html_report(run: RunFolder, threshold: float) -> Callable[[], str]:
    """Deferred ``export_html(run, threshold)`` for ``st.download_button``: built only when clicked."""
    path = str(run.root)

    def make() -> str:
        from core.export import export_html

        return export_html(RunFolder(path), threshold)

    return make


@st.cache_resource(show_spinner="Loading models and SAEs ...", max_entries=2)
def _bundle(path: str, stamp: int):
    from core.analysis import load_bundle

    return load_bundle(RunFolder(path), lenient=True)


def bundle(run: RunFolder):
    """Tokenizer, both models and every SAE of the run (loaded once per run and server); an SAE or
    class-name file that cannot be used is left out, its message in ``sae_problems`` /
    ``labels_problem`` (``bundle_warnings``)."""
    return _bundle(str(run.root), shared.run_stamp(str(run.root)))


@st.cache_resource(show_spinner="Running both models on the sentence ...", max_entries=32)
def _sentence_state(path: str, stamp: int, text: str):
    """Both models' forward passes for one sentence (kept unpickled: it holds every hidden state)."""
    from core.analysis import sentence_state

    return sentence_state(_bundle(path, stamp), text)


@st.cache_data(show_spinner="Analysing the sentence ...", max_entries=64)
def _analysis(path: str, stamp: int, text: str, top: int, rank_by: str, sae: tuple[str, int] | None, compared: tuple[str, ...]) -> dict:
    from core.analysis import analyze_text

    states = [_sentence_state(path, stamp, t) for t in compared] if len(compared) > 1 else None
    return analyze_text(_bundle(path, stamp), text, top=top, rank_by=rank_by, state=_sentence_state(path, stamp, text), saes=[sae] if sae else [], compared=states)


def analysis(run: RunFolder, text: str, top: int, rank_by: str, sae: tuple[str, int] | None, compared: tuple[str, ...] = ()) -> dict:
    """``analyze_text`` for one sentence, cached by text, with the top features of one (model, layer)
    SAE only (``None``: none); the forward passes are shared by every SAE choice. ``compared``:
    every sentence shown beside it (it included), which a per-sentence ranking ranks together."""
    return _analysis(str(run.root), shared.run_stamp(str(run.root)), text, top, rank_by, sae, compared)


@st.cache_data(show_spinner=False, max_entries=128)
def _sentence_features(path: str, stamp: int, text: str, layer: int, feature: int, sae_model: str) -> dict:
    from core.analysis import sentence_features

    return sentence_features(_bundle(path, stamp), _sentence_state(path, stamp, text), layer, feature, sae_model=sae_model)


def sentence_features(run: RunFolder, text: str, layer: int, feature: int, sae_model: str) -> dict:
    """One SAE feature per token for both models' hidden states, cached by text."""
    return _sentence_features(str(run.root), shared.run_stamp(str(run.root)), text, layer, feature, sae_model)


@st.cache_data(show_spinner=False, max_entries=128)
def _matched_features(path: str, stamp: int, text: str, layer: int, feature: int, sae_model: str) -> dict:
    from core.analysis import matched_features

    return matched_features(_bundle(path, stamp), _sentence_state(path, stamp, text), layer, feature, sae_model)


def matched_features(run: RunFolder, text: str, layer: int, feature: int, sae_model: str = "pretrained") -> dict:
    """A feature of ``sae_model``'s SAE on that model next to its matched partner on the other model."""
    return _matched_features(str(run.root), shared.run_stamp(str(run.root)), text, layer, feature, sae_model)


@st.cache_data(show_spinner="Reading feature statistics ...", max_entries=16)
def _feature_table(path: str, stamp: int, model: str, layer: int, by: str) -> pd.DataFrame:
    from core.features_step import feature_table

    return feature_table(RunFolder(path), model, layer, by=by, lenient=True)


def feature_table(run: RunFolder, model: str, layer: int, by: str = "variance") -> pd.DataFrame:
    """One row per feature of the (model, layer) SAE, best first by ``by``; a matching file that
    cannot be used leaves out the match columns (its message in ``attrs["matching_problem"]``)."""
    return _feature_table(str(run.root), shared.run_stamp(str(run.root)), model, layer, by)


@st.cache_data(show_spinner=False, max_entries=128)
def _feature_card(path: str, stamp: int, model: str, layer: int, feature: int, top: int | None) -> dict:
    from core.features_step import feature_card

    return feature_card(RunFolder(path), model, layer, feature, top=top, lenient=True)


def feature_card(run: RunFolder, model: str, layer: int, feature: int, top: int | None = None) -> dict:
    return _feature_card(str(run.root), shared.run_stamp(str(run.root)), model, layer, feature, top)


@st.cache_data(show_spinner=False, max_entries=4)
def _test_texts(path: str, stamp: int) -> dict:
    from core.data import load_split

    frame = load_split(RunFolder(path), "test")
    return dict(zip(frame["id"].tolist(), frame["text"].tolist()))


def example_text(run: RunFolder, example_id: int) -> str:
    """The text of one test example (the features step's top examples name them by id)."""
    return _test_texts(str(run.root), shared.run_stamp(str(run.root)))[example_id]
