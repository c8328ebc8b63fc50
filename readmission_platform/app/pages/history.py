"""History: recent predictions from the prediction log, without identifiers, with the outcome where it has come back."""

import streamlit as st

from readmission_platform.app import state
from readmission_platform.app.history import RECENT, filtered, read_recent
from readmission_platform.lib.predictions import PredictionLogError
from readmission_platform.lib.warehouse import WarehouseError

st.title("Recent predictions")
_, platform = state.settings()
try:
    rows = read_recent(platform.prediction_log_url, platform.warehouse_url)
except (PredictionLogError, WarehouseError, OSError) as error:
    st.error(f"the prediction log or the warehouse cannot be read: {error}")
    st.stop()
if rows.is_empty():
    st.info("No predictions logged yet: they appear here once the service has answered one.")
    st.stop()
left, right = st.columns(2)
versions = left.multiselect("Model version", sorted(rows["model_version"].unique().to_list()), key="versions")
bands = right.multiselect("Risk band", ["high", "medium", "low"], key="bands")
shown = filtered(rows, versions, bands)
matured = shown.filter(shown["outcome"] != "not known yet").height
st.caption(f"The latest {RECENT:,} predictions at most, newest first: {shown.height:,} shown, {matured:,} with their "
           "outcome known.")  # fmt: skip
st.dataframe(shown, hide_index=True)
