"""Model: the model card of the version serving, as /model tells it, and what the warehouse records of it."""

import streamlit as st

from readmission_platform.app import state
from readmission_platform.app.card import PROMOTIONS, SECTIONS, figure, metrics_table, recorded, table
from readmission_platform.lib.warehouse import WarehouseError

st.title("The model serving now")
info = state.model()
if info is None:
    st.stop()
st.subheader(f"{info.get('name', 'model')} version {info.get('version', '?')}")
facts = {
    "model family": info.get("family"),
    "serving as": info.get("stage") or info.get("alias"),
    "decision threshold": figure(info.get("threshold")),
    "usual rate of readmission (validation)": figure(info.get("base_rate")),
    "trained at": info.get("trained_at"),
    "trained on batches": ", ".join(info.get("trained_batches") or []) or None,
    "training rows": ", ".join(f"{k} {v:,}" for k, v in (info.get("training_rows") or {}).items()) or None,
    "promoted at": info.get("promoted_at"),
    "why promoted": info.get("promotion_reason"),
    "loaded by this worker at": info.get("loaded_at"),
    "explanations": info.get("explain_method"),
}
st.table({"fact": list(k for k, v in facts.items() if v), "value": [str(v) for v in facts.values() if v]})

st.subheader("Metrics")
metrics = metrics_table(info)
if metrics.is_empty():
    st.info("/model reports no metrics for this version.")
else:
    st.dataframe(metrics, hide_index=True)
    st.caption("Intervals, where shown, are the service's own (estimate, then lower to upper).")

_, platform = state.settings()
try:
    records = recorded(platform.warehouse_url)
except (WarehouseError, OSError) as error:
    records = {}
    st.warning(f"the warehouse cannot be read for the promotion history and live performance: {error}")

for key, title in SECTIONS.items():
    st.subheader(title)
    given = table(info.get(key))
    if given is not None:
        st.dataframe(given, hide_index=True)
        if key == "calibration" and {"mean_predicted", "observed_rate"} <= set(given.columns):
            st.line_chart(given, x="mean_predicted", y="observed_rate")
    elif key in records:
        st.dataframe(records[key], hide_index=True)
        st.caption(f"from the warehouse's `{key if key != 'promotion_history' else PROMOTIONS}` table")
    else:
        st.caption(f"Not reported: this service's /model has no `{key}`, and the warehouse holds none yet.")

st.subheader("Rollout")
candidate = info.get("candidate")
if candidate:
    st.write(f"Candidate version {candidate.get('version', '?')} is in **{candidate.get('stage', '?')}**"
             + (f", answering {figure(candidate['share'])} of requests" if candidate.get("share") else "") + ".")  # fmt: skip
    with st.expander("What /model says of the candidate"):
        st.json(candidate)
elif "candidate" in info:
    st.caption("No candidate is in shadow or canary: every answer comes from this version.")
else:
    st.caption("Not reported: this service's /model says nothing of a candidate.")

with st.expander("Everything /model says"):
    st.json(info)
