"""The Predict page's form, derived from the one schema: a field per request column, its allowed values and what they
mean, its default, and the request it makes. Pure: the page only draws what this describes."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import icd9_group_of
from readmission_platform.lib.codes import CODED_COLUMNS, code_descriptions
from readmission_platform.lib.encounter import FIELDS, REQUEST_DTYPES, allowed
from readmission_platform.lib.source import read_source_bytes

UNKNOWN = "unknown"
# What a lab result or a medication status means, for the select boxes.
MEANINGS: dict[str, dict[Any, str]] = {
    "max_glu_serum": {schema.NOT_TAKEN: "not measured", "Norm": "normal", ">200": "above 200 mg/dL",
                      ">300": "above 300 mg/dL"},
    "A1Cresult": {schema.NOT_TAKEN: "not measured", "Norm": "normal (below 7 %)", ">7": "7 % to 8 %",
                  ">8": "above 8 %"},
    "change": {"No": "no change", "Ch": "changed"},
    "diabetesMed": {"No": "none prescribed", "Yes": "prescribed"},
    **{name: {"No": "not taken", "Steady": "dose steady", "Up": "dose raised", "Down": "dose lowered"}
       for name in schema.MEDICATIONS},
}  # fmt: skip
LABELS = {
    "race": "Race", "gender": "Gender", "age": "Age (years)", "weight": "Weight (pounds)",
    "admission_type_id": "Admission type", "discharge_disposition_id": "Discharged to",
    "admission_source_id": "Admitted from", "time_in_hospital": "Days in hospital", "payer_code": "Payer code",
    "medical_specialty": "Admitting specialty", "num_lab_procedures": "Lab tests", "num_procedures": "Other procedures",
    "num_medications": "Distinct drugs given", "number_outpatient": "Outpatient visits, past year",
    "number_emergency": "Emergency visits, past year", "number_inpatient": "Inpatient stays, past year",
    "diag_1": "Primary diagnosis (ICD-9)", "diag_2": "Secondary diagnosis (ICD-9)",
    "diag_3": "Additional diagnosis (ICD-9)", "number_diagnoses": "Diagnoses entered",
    "max_glu_serum": "Max glucose serum", "A1Cresult": "HbA1c", "change": "Diabetes medication changed",
    "diabetesMed": "Diabetes medication",
}  # fmt: skip
# Common values of the free-text columns offered first; any other may be typed.
MAX_SUGGESTIONS = 40


@dataclass(frozen=True)
class FormField:
    """One request column as the form shows it."""

    name: str  # the data set's column, as the request spells it
    kind: Literal["choice", "count", "icd9", "text"]
    label: str
    default: Any
    options: tuple = ()  # choice: the values a request may give (None: unknown); text: suggestions
    meanings: Mapping[Any, str] = field(default_factory=dict)  # choice: value → words
    range: tuple[int, int] | None = None
    help: str = ""

    def describe(self, value: Any) -> str:
        """A choice's value in words, as its select box lists it."""
        if value is None:
            return UNKNOWN
        meaning = self.meanings.get(value)
        return f"{value} · {meaning}" if meaning and meaning != str(value) else str(value)


def reference_frame(source: bytes | None = None) -> pl.DataFrame:
    """The request columns of the bundled data set as text, unknown ('?') as null: where the defaults come from."""
    data = source if source is not None else read_source_bytes()
    return pl.read_csv(io.BytesIO(data), columns=list(FIELDS), infer_schema=False, null_values=schema.MISSING)


def _typical(values: pl.Series, integer: bool) -> Any:
    """The median of a count; the most common value of anything else, unknown (None) when unknown is most common."""
    if integer:
        return int(values.drop_nulls().cast(pl.Int64).median())
    counts = values.value_counts(sort=True, name="n")
    return counts.filter(pl.col("n") == pl.col("n").max()).sort(values.name, nulls_last=False)[values.name][0]


def form_fields(reference: pl.DataFrame) -> list[FormField]:
    """Every request column as a form field, in the request's order, with the data set's typical value as default."""
    codes = code_descriptions()
    fields = []
    for name in FIELDS:
        column = schema.CLEAN_BY_NAME[name]
        integer = REQUEST_DTYPES[name].is_integer()
        default = _typical(reference[name], integer)
        label = LABELS.get(name, name)
        if name in CODED_COLUMNS:
            options = tuple(column.allowed)
            help_text = f"{name}: the codes of the data set's IDs_mapping.csv"
            if name == "discharge_disposition_id":
                options = tuple(c for c in options if c not in schema.DEATH_OR_HOSPICE_DISPOSITIONS)
                help_text += "; death and hospice are left out, as no readmission risk is predicted for them"
            fields.append(FormField(name, "choice", label, int(default), options, codes[name], help=help_text))
        elif column.allowed is not None:
            options = (*((None,) if column.nullable else ()), *allowed(column))
            fields.append(FormField(name, "choice", label, default, options, MEANINGS.get(name, {}), help=name))
        elif column.range is not None:
            fields.append(FormField(name, "count", label, default, range=column.range, help=f"{name}: {column.description}"))
        elif name.startswith("diag_"):
            fields.append(FormField(name, "icd9", label, default, help=f"{name}: an ICD-9 code as the data set writes "
                                    "it (428, 250.02, V57, E878); empty if none"))  # fmt: skip
        else:
            common = reference[name].drop_nulls().value_counts(sort=True).head(MAX_SUGGESTIONS)[name].to_list()
            fields.append(FormField(name, "text", label, default, tuple(common), help=f"{name}; empty if unknown"))
    return fields


def diagnosis_group(code: str | None) -> str:
    """The ICD-9 chapter group the model sees for a code, in words for the form."""
    code = (code or "").strip()
    if not code:
        return "no diagnosis entered"
    if not schema.ICD9_PATTERN.match(code):
        return f"'{code}' is not an ICD-9 code as the data set writes it (428, 250.02, V57, E878)"
    return f"group: {icd9_group_of(code)}"


def encounter_request(values: Mapping[str, Any], patient_id: str | None = None) -> dict[str, Any]:
    """The form's values → the /predict body: text stripped, empty text as unknown, the patient identifier only if
    given (and only when the service declares it)."""
    request: dict[str, Any] = {}
    for name in FIELDS:
        value = values.get(name)
        if isinstance(value, str):
            value = value.strip() or None
        request[name] = value
    if patient_id and patient_id.strip():
        request["patient_id"] = patient_id.strip()
    return request
