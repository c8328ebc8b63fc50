"""The app's entry point, as `streamlit run` takes it (`readmission app`): the pages, and where the service is."""

import streamlit as st

from readmission_platform.app import state

st.set_page_config(page_title="Readmission risk", page_icon=":material/local_hospital:", layout="wide")
page = st.navigation(
    [
        st.Page("pages/predict.py", title="Predict", icon=":material/person:", default=True),
        st.Page("pages/batch.py", title="Batch", icon=":material/table:"),
        st.Page("pages/model.py", title="Model", icon=":material/insights:"),
        st.Page("pages/history.py", title="History", icon=":material/history:"),
    ]
)
app_settings, _ = state.settings()
st.sidebar.caption(f"Prediction service: {app_settings.service_url}")
page.run()
