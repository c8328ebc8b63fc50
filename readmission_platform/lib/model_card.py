"""A model card per registered version: what it learned from, how it scores on held-out patients (with patient-bootstrap
intervals), how well its probabilities are calibrated, whom it may serve worse, what it assumes and what it is for.

`promotion_decision` builds it when it scores a challenger on the test patients and stores it in the version's MLflow
run as JSON (`CARD_JSON`, which /model answers) and markdown (`CARD_MARKDOWN`, for a reader of the run).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from readmission_platform.lib import metrics, schema
from readmission_platform.lib.features import FEATURE_COLUMNS, by_field

CARD_JSON, CARD_MARKDOWN = "model_card.json", "model_card.md"
CARD_RESAMPLES = 200

INTENDED_USE = (
    "Ranking adult diabetic inpatients at discharge by their risk of readmission within 30 days, so that a care team "
    "can choose whom to follow up first. A flag (probability at or above the threshold) is a prompt for a person to "
    "look, not a decision about care."
)
NOT_INTENDED = (
    "Denying or rationing care, pricing or insurance decisions, patients outside the data's population (non-diabetic, "
    "children, discharges to death or hospice, which the service refuses), or any use without a clinician's review."
)
ASSUMPTIONS = (
    "The data are the UCI 'Diabetes 130-US hospitals' encounters of 1999-2008; today's patients and practice differ.",
    "The data have no dates: `encounter_id` order is taken as time order (the age bracket of consecutive encounters of "
    "one patient rises 1,567 times and falls 18 times); features from a patient's history use only earlier encounters "
    "in that order.",
    "A prior encounter's 30-day outcome is used only where it is known at admission, and every earlier one's is: by "
    "then the previous encounter's 30-day window has closed, or this admission is inside it and is its readmission. At "
    "serving, an encounter the service scored counts in the patient's history once its outcome has come back.",
    "Train, validation and test sides are split by patient (a hash of `patient_nbr`): no patient is on two sides, so "
    "test figures are those of patients the model never saw.",
    "Settings and the threshold (best validation F1) were chosen on validation; test figures are out of sample. The "
    "sigmoid calibration was fitted on validation.",
    "Intervals are 95 % percentile intervals from resampling test patients with all their encounters.",
    "Race, gender and age are recorded by the hospitals; groups with few encounters have wide uncertainty.",
)


def _rounded(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if isinstance(value, float | np.floating) and np.isfinite(value) else value


def build_card(
    *,
    version: str,
    family: str,
    threshold: float,
    params: Mapping[str, Any],
    lineage: Mapping[str, str],
    validation: Mapping[str, float],
    test: pl.DataFrame,
    probability: np.ndarray,
    test_metrics: Mapping[str, float],
    subgroups: pl.DataFrame,
    resamples: int = CARD_RESAMPLES,
) -> dict[str, Any]:
    """The card of one version from its test rows and their probabilities (and the metrics already computed of them)."""
    y = test.get_column(schema.LABEL_30D).cast(pl.Int8).to_numpy()
    intervals = metrics.bootstrap_intervals(test["patient_nbr"], y, probability, resamples=resamples)
    calibration = metrics.calibration_fit(y, probability)
    return {
        "version": str(version),
        "family": family,
        "params": {k: str(v) for k, v in params.items()},
        "threshold": _rounded(threshold, 6),
        "intended_use": INTENDED_USE,
        "not_intended_for": NOT_INTENDED,
        "assumptions": list(ASSUMPTIONS),
        "data": {
            "source": "UCI Diabetes 130-US hospitals, 1999-2008 (101,766 encounters in the full set)",
            "batches": [b for b in lineage.get("batch_ids", "").split(",") if b],
            "rows": {side: int(lineage[f"{side}_rows"]) for side in ("train", "validation", "test") if f"{side}_rows" in lineage},
            "test_patients": int(test["patient_nbr"].n_unique()),
            "label": "readmitted within 30 days of discharge (`readmitted` == '<30')",
        },
        "split": "patient-grouped 70/15/15 by a hash of patient_nbr (lib/splitting.py); no patient on two sides",
        "features": {field: list(found) for field, found in by_field(dict.fromkeys(FEATURE_COLUMNS, 0.0)).items()},
        "test_metrics": {
            row["metric"]: {k: _rounded(row[k]) for k in ("estimate", "lower", "upper")} for row in intervals.iter_rows(named=True)
        }
        | {name: _rounded(test_metrics[name]) for name in ("base_rate_brier", "log_loss", "precision", "recall", "f1", "positive_rate")},
        "validation_metrics": {name: _rounded(validation[name]) for name in ("roc_auc", "pr_auc", "brier") if name in validation},
        "calibration": {
            "slope": _rounded(calibration["calibration_slope"]),
            "intercept": _rounded(calibration["calibration_intercept"]),
            "deciles": [
                {k: _rounded(v) for k, v in row.items()}
                for row in metrics.calibration_table(y, probability).select("bin", "rows", "mean_predicted", "observed_rate").iter_rows(named=True)
            ],
        },
        "subgroups": [
            {k: _rounded(v) for k, v in row.items()}
            for row in subgroups.select("by", "group", "rows", "positives", "roc_auc", "brier", "mean_predicted", "observed_rate").iter_rows(named=True)
        ],
    }


def _table(rows: list[Mapping[str, Any]]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(card: Mapping[str, Any]) -> str:
    """The card for a person to read."""
    test = card["test_metrics"]
    interval = [
        {"metric": name, **test[name]} for name in ("roc_auc", "pr_auc", "brier") if isinstance(test.get(name), dict)
    ]
    data = card["data"]
    return "\n\n".join([
        f"# Model card: readmission-classifier v{card['version']} ({card['family']})",
        f"## Intended use\n{card['intended_use']}\n\nNot for: {card['not_intended_for']}",
        "## Data\n" + f"{data['source']}. Batches: {', '.join(data['batches']) or 'unknown'}. Rows: "
        + ", ".join(f"{side} {n:,}" for side, n in data["rows"].items()) + f"; {data['test_patients']:,} test patients. "
        + f"Label: {data['label']}.",
        f"## Split\n{card['split']}.",
        "## Features\n" + "\n".join(f"- **{field}**: {', '.join(names)}" for field, names in card["features"].items()),
        f"## Test metrics (95 % patient-bootstrap intervals)\n{_table(interval)}\n\nBase-rate Brier "
        f"{test['base_rate_brier']}; at the threshold {card['threshold']}: precision {test['precision']}, recall "
        f"{test['recall']}, F1 {test['f1']}, {test['positive_rate']} of encounters flagged.",
        f"## Calibration\nSlope {card['calibration']['slope']} (1 is ideal), intercept {card['calibration']['intercept']} "
        f"(0 is ideal).\n\n{_table(card['calibration']['deciles'])}",
        f"## Subgroups (test)\n{_table(card['subgroups'])}",
        "## Assumptions\n" + "\n".join(f"- {a}" for a in card["assumptions"]),
    ]) + "\n"  # fmt: skip


def log_card(client, run_id: str, card: Mapping[str, Any]) -> None:
    """Store the card in a version's MLflow run, as JSON and markdown (`client`: an MlflowClient on its store)."""
    client.log_text(run_id, json.dumps(card, indent=2), CARD_JSON)
    client.log_text(run_id, to_markdown(card), CARD_MARKDOWN)


def read_card(client, run_id: str) -> dict[str, Any] | None:
    """The card stored in a run, or None when it has none (never scored on test, or its artifacts are gone)."""
    if CARD_JSON not in {f.path for f in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as folder:
        return json.loads(Path(client.download_artifacts(run_id, CARD_JSON, folder)).read_text())
