"""The evaluation plots logged with every candidate: ROC, precision-recall and calibration."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in workers

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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
