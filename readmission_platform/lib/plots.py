"""The evaluation plots logged with every candidate (ROC, precision-recall, calibration) and the live figures over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from readmission_platform.lib.metrics import calibration_table  # noqa: E402


def evaluation_plots(y_true: np.ndarray, probability: np.ndarray, folder: Path, title: str) -> dict[str, Path]:
    """Write roc.png, precision_recall.png and calibration.png into `folder`; return name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}

    figure, axes = plt.subplots(figsize=(5, 5))
    fpr, tpr, _ = roc_curve(y_true, probability)
    axes.plot(fpr, tpr, label=title)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    axes.legend(loc="lower right")
    paths["roc"] = _save(figure, folder / "roc.png")

    figure, axes = plt.subplots(figsize=(5, 5))
    precision, recall, _ = precision_recall_curve(y_true, probability)
    axes.plot(recall, precision, label=title)
    axes.axhline(float(np.mean(y_true)), linestyle="--", color="grey", label="base rate")
    axes.set(xlabel="recall", ylabel="precision", title="precision-recall")
    axes.legend(loc="upper right")
    paths["precision_recall"] = _save(figure, folder / "precision_recall.png")

    figure, axes = plt.subplots(figsize=(5, 5))
    table = calibration_table(y_true, probability)
    axes.plot(table["mean_predicted"], table["observed_rate"], marker="o", label=title)
    top = max(float(table["mean_predicted"].max()), float(table["observed_rate"].max()))
    axes.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect calibration")
    axes.set(xlabel="mean predicted probability", ylabel="observed <30 rate", title="calibration (deciles)")
    axes.legend(loc="upper left")
    paths["calibration"] = _save(figure, folder / "calibration.png")
    return paths


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def live_plot(periods: pl.DataFrame, path: Path) -> Path:
    """ROC-AUC, and mean predicted against observed readmission rate, per period and model version (`live.by_period`)."""
    figure, (ranking_axes, rate_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for (version,), part in periods.group_by("model_version", maintain_order=True):
        ranking_axes.plot(part["period"].to_list(), part["roc_auc"].to_list(), marker="o", label=f"v{version}")
        line = rate_axes.plot(part["period"].to_list(), part["observed_rate"].to_list(), marker="o", label=f"v{version} observed")
        rate_axes.plot(part["period"].to_list(), part["mean_predicted"].to_list(), linestyle="--",
                       color=line[0].get_color(), label=f"v{version} predicted")  # fmt: skip
    ranking_axes.set(xlabel="predicted on", ylabel="ROC-AUC", title="live ROC-AUC")
    rate_axes.set(xlabel="predicted on", ylabel="rate", title="readmitted <30 days: observed vs predicted")
    for axes in (ranking_axes, rate_axes):
        axes.legend(loc="best", fontsize="small")
        axes.tick_params(axis="x", labelrotation=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(figure, path)
