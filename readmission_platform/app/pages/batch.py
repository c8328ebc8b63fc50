"""Batch: a CSV export of encounters checked row by row, scored through /predict_batch, and given back with the scores."""

import streamlit as st

from readmission_platform.app import state
from readmission_platform.app.batch import UploadError, check_rows, read_upload, score
from readmission_platform.app.client import ServiceError

st.title("Score a file of encounters")
st.write("Upload a CSV export with the data set's columns (identifier and label columns may stay: they are never "
         "sent). Each row is checked first; the valid rows are scored, and the file comes back with the scores.")  # fmt: skip
upload = st.file_uploader("CSV export of encounters", type=["csv"], key="upload")
if upload is not None:
    try:
        checked = check_rows(read_upload(upload.getvalue(), upload.name))
    except UploadError as error:
        st.error(str(error))
        st.stop()
    problems = [p for p in checked.problems if p is not None]
    st.write(f"{checked.rows.height:,} rows: {checked.valid:,} valid, {len(problems):,} with a problem.")
    if problems:
        with st.expander(f"Rows that will not be scored ({len(problems):,})", expanded=True):
            st.dataframe({"problem": problems}, hide_index=True)
    if checked.valid and st.button(f"Score {checked.valid:,} encounters", type="primary", key="score"):
        bar = st.progress(0.0, text="scoring…")
        try:
            scored = score(checked, state.client(),
                           lambda done, total: bar.progress(done / total, text=f"{done:,} of {total:,} scored"))  # fmt: skip
        except ServiceError as error:
            st.error(str(error))
        else:
            st.session_state.scored = (upload.name, scored)
    if (kept := st.session_state.get("scored")) and kept[0] == upload.name:
        name, scored = kept
        st.success(f"{scored['probability'].is_not_null().sum():,} encounters scored; "
                   f"{scored['flagged'].sum():,} flagged for follow-up.")  # fmt: skip
        st.dataframe(scored.select("probability", "risk_band", "flagged", "model_version", "problem").head(200))
        st.download_button("Download the scored CSV", scored.write_csv(), file_name=name.removesuffix(".csv") + "_scored.csv",
                           mime="text/csv", key="download")  # fmt: skip
