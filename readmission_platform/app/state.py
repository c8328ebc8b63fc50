"""What every page shares: the settings, read once per session, and the service's client and model facts."""

from __future__ import annotations

from typing import Any

import streamlit as st

from readmission_platform.app.client import ServiceClient, ServiceError
from readmission_platform.app.form import FormField, form_fields, reference_frame
from readmission_platform.settings import AppSettings, Settings

MODEL_SECONDS = 10  # how long the model's facts are reused before /model is asked again: the alias may move


def settings() -> tuple[AppSettings, Settings]:
    """The app's and the platform's settings, read from the environment once per session."""
    if "settings" not in st.session_state:
        st.session_state.settings = (AppSettings.from_env(), Settings.from_env())
    return st.session_state.settings


@st.cache_resource
def _client(url: str, token: str | None) -> ServiceClient:
    return ServiceClient(url, token)


def client() -> ServiceClient:
    app, _ = settings()
    return _client(app.service_url, app.api_token)


@st.cache_data(ttl=MODEL_SECONDS, show_spinner=False)
def _model(url: str, token: str | None) -> dict[str, Any]:
    return _client(url, token).model()


def model() -> dict[str, Any] | None:
    """/model of the version serving, or None after saying plainly why there is none (service down, no model)."""
    app, _ = settings()
    try:
        return _model(app.service_url, app.api_token)
    except ServiceError as error:
        st.error(str(error))
        return None


@st.cache_data(ttl=60, show_spinner=False)
def request_fields(url: str, token: str | None) -> set[str]:
    try:
        return _client(url, token).request_fields()
    except ServiceError:  # an address that is no URL: the page says so when it asks the service
        return set()


@st.cache_data(show_spinner="Reading the data set's typical values…")
def fields() -> list[FormField]:
    """The form's fields; their defaults and suggestions come from the bundled data set, read once."""
    return form_fields(reference_frame())
