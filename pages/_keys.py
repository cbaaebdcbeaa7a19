"""Session-state keys of the dashboard: every widget and value a page keeps between reruns.

The only module that names keys, so two pages never share one by accident. Feature pickers get one
key per run, SAE and ranking (a feature number picked for one SAE means nothing for another).
"""

from __future__ import annotations

import hashlib

import streamlit as st

from core.runfolder import RunFolder
from pages import _shared as shared

KEY_RUN = "ls_run"  # path of the selected run (str) or None
KEY_RUN_SELECT = "ls_run_select"  # sidebar selectbox
KEY_RUN_TEXT = "ls_run_text"  # sidebar "other run folder" text box
KEY_RUN_MESSAGE = "ls_run_message"  # message about a run path that could not be opened
KEY_QUERY_RUN = "ls_query_run"  # last ?run= value applied, so it is applied once
KEY_CLAIM_THRESHOLD = "ls_claim_threshold"
KEY_SAE_EVERY_COLUMN = "ls_sae_every_column"  # overview: the SAE table's every-column toggle
KEY_SIM_MEASURES = "ls_sim_measures"
KEY_SIM_OVERLAY = "ls_sim_overlay"
KEY_SIM_NORMALISE = "ls_sim_normalise"
KEY_TEXT = "ls_text"
KEY_TEXT_B = "ls_text_b"
KEY_COMPARE = "ls_compare"
KEY_EX_MODEL = "ls_ex_model"
KEY_EX_LAYER = "ls_ex_layer"
KEY_EX_RANK = "ls_ex_rank"
KEY_EX_TOP = "ls_ex_top"
KEY_EX_MATCHED = "ls_ex_matched"
KEY_EX_STACK = "ls_ex_stack"  # compared sentences one above the other instead of side by side
KEY_EX_OPEN_CARD = "ls_ex_open_card"  # the explorer's button that opens the chosen feature in the feature browser
KEY_EX_LINK = "ls_ex_link"  # the explorer link (?text=...) last applied, so each is applied once
KEY_EX_LINK_FEATURE = "ls_ex_link_feature"  # (model, layer, feature) a link or the feature browser asks for, until the picker takes it
KEY_FB_MODEL = "ls_fb_model"
KEY_FB_LAYER = "ls_fb_layer"
KEY_FB_RANK = "ls_fb_rank"
KEY_FB_OPEN_EXAMPLE = "ls_fb_open_example"  # prefix of the buttons that open a top example in the explorer
KEY_FB_TABLE = "ls_fb_table"  # prefix of the feature table's key (see ``browser_table_key``)


def _run_tag(run: RunFolder) -> str:
    """The run's folder and stamp: a run rebuilt in place (new SAEs) starts fresh picks."""
    return hashlib.sha1(f"{run.root.resolve()}:{shared.run_stamp(str(run.root))}".encode()).hexdigest()[:10]


def explorer_feature_key(run: RunFolder, model: str, layer: int, ranking: str) -> str:
    """Widget key of the explorer's feature picker for one SAE of one run and ranking (each keeps
    its own choice: a feature number picked on one run means nothing on another, and a new
    ranking starts at its own top feature, as in the feature browser)."""
    return f"ls_ex_feature_{_run_tag(run)}_{model}_{layer}_{ranking}"


def browser_feature_key(run: RunFolder, model: str, layer: int, ranking: str) -> str:
    """Widget key of the feature browser's feature picker for one SAE of one run and ranking."""
    return f"ls_fb_feature_{_run_tag(run)}_{model}_{layer}_{ranking}"


def browser_table_key(feature_key: str) -> str:
    """Widget key of the feature browser's table shown with the picker ``feature_key``: one per
    SAE and ranking, renewed whenever the feature is typed in, so a checked row always names the
    feature shown (a row checked in one table stayed checked in every other)."""
    generation = st.session_state.get(f"{feature_key}_typed", 0)
    return f"{KEY_FB_TABLE}_{feature_key}_{generation}"


def feature_typed(feature_key: str) -> None:
    """``on_change`` of a feature picker: drop the table's row selection (see ``browser_table_key``)."""
    st.session_state[f"{feature_key}_typed"] = st.session_state.get(f"{feature_key}_typed", 0) + 1
