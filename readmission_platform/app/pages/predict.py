"""Predict: one encounter entered in a form, its risk of readmission within 30 days, and what drove it."""

import uuid

import altair as alt
import streamlit as st

from readmission_platform.app import state
from readmission_platform.app.answers import DOWN, UP, contributions_frame, explained_elsewhere, percent, risk_in_words
from readmission_platform.app.client import PATIENT_ID, ServiceError
from readmission_platform.app.form import FormField, diagnosis_group, encounter_request
from readmission_platform.lib import schema

SECTIONS = {
    "Patient": ("race", "gender", "age", "weight", "payer_code"),
    "Admission": ("admission_type_id", "admission_source_id", "discharge_disposition_id", "time_in_hospital",
                  "medical_specialty"),
    "During the stay": ("num_lab_procedures", "num_procedures", "num_medications", "number_diagnoses",
                        "max_glu_serum", "A1Cresult"),
    "The year before": ("number_outpatient", "number_emergency", "number_inpatient"),
}  # fmt: skip
MEDICATION_COLUMNS = 4


def draw(spec: FormField, container=st):
    """The widget of one field; returns its value."""
    key = f"field:{spec.name}"
    if spec.kind == "choice":
        return container.selectbox(spec.label, spec.options, index=spec.options.index(spec.default),
                                   format_func=spec.describe, key=key, help=spec.help)  # fmt: skip
    if spec.kind == "count":
        low, high = spec.range
        return container.number_input(spec.label, low, high, spec.default, step=1, key=key, help=spec.help)
    if spec.kind == "icd9":
        code = container.text_input(spec.label, spec.default or "", key=key, help=spec.help)
        container.caption(diagnosis_group(code))
        return code
    options = (None, *spec.options)
    return container.selectbox(spec.label, options, index=options.index(spec.default), key=key, help=spec.help,
                               format_func=lambda v: "unknown" if v is None else v, accept_new_options=True)  # fmt: skip


st.title("Risk of readmission within 30 days")
app_settings, _ = state.settings()
fields = {spec.name: spec for spec in state.fields()}
values = {}

offers_patient_id = PATIENT_ID in state.request_fields(app_settings.service_url, app_settings.api_token)
patient_id = st.text_input("Patient identifier (optional)", key="patient_id",
                           help="Sent to the service so it can look up the patient's history; never shown here.") \
    if offers_patient_id else None  # fmt: skip

columns = st.columns(len(SECTIONS))
for column, (section, names) in zip(columns, SECTIONS.items(), strict=True):
    column.subheader(section)
    for name in names:
        values[name] = draw(fields[name], column)

st.subheader("Diagnoses")
for column, name in zip(st.columns(3), ("diag_1", "diag_2", "diag_3"), strict=True):
    values[name] = draw(fields[name], column)

st.subheader("Diabetes medications")
left, right = st.columns(2)
values["diabetesMed"] = draw(fields["diabetesMed"], left)
values["change"] = draw(fields["change"], right)
grid = st.columns(MEDICATION_COLUMNS)
for i, name in enumerate(schema.MEDICATIONS):
    values[name] = draw(fields[name], grid[i % MEDICATION_COLUMNS])

if st.button("Predict", type="primary", key="predict"):
    request = encounter_request(values, patient_id) | {"request_id": f"app-{uuid.uuid4().hex}"}
    try:
        client = state.client()
        st.session_state.answer = {"prediction": client.predict(request), "request": request, "explanation": None,
                                   "explain_error": None}
    except ServiceError as error:
        st.session_state.answer = None
        st.error(str(error))
    else:
        try:
            st.session_state.answer["explanation"] = client.explain(request)
        except ServiceError as error:
            st.session_state.answer["explain_error"] = str(error)

if answer := st.session_state.get("answer"):
    prediction = answer["prediction"]
    model = state.model() or {}
    st.divider()
    st.header("Answer")
    left, middle, right = st.columns(3)
    left.metric("Probability of readmission within 30 days", percent(prediction["probability"]))
    middle.metric("Risk band", prediction["risk_band"])
    right.metric("Flag threshold", percent(prediction["threshold"]))
    st.markdown(risk_in_words(prediction, model.get("base_rate")))
    st.caption(f"Model {prediction['model_name']} version {prediction['model_version']}"
               + (f" ({model['family']})" if model.get("family") else "") + f"; request {prediction['request_id']}")  # fmt: skip
    if answer["explain_error"]:
        st.warning(f"No explanation: {answer['explain_error']}")
    elif answer["explanation"] is not None:
        explanation = answer["explanation"]
        st.subheader("What pushed the risk up and down")
        pushes = contributions_frame(explanation, answer["request"])
        chart = (
            alt.Chart(pushes.to_pandas())
            .mark_bar()
            .encode(
                x=alt.X("contribution:Q", title="push on the risk"),
                y=alt.Y("feature:N", sort=None, title=None, axis=alt.Axis(labelLimit=360)),
                color=alt.Color("direction:N", scale=alt.Scale(domain=[UP, DOWN], range=["#d62728", "#1f77b4"]),
                                legend=alt.Legend(title=None, orient="bottom")),  # fmt: skip
                tooltip=["feature", "value", "contribution", "direction"],
            )
        )
        st.altair_chart(chart, width="stretch")
        st.caption(f"Strongest first; bars to the right raise the risk. {explanation['method']}")
        if elsewhere := explained_elsewhere(prediction, explanation):
            st.info(elsewhere)
        st.dataframe(pushes, hide_index=True)
