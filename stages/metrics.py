"""Task metrics from logits: accuracy and macro-F1 for classes, MSE and Pearson r for regression."""
from __future__ import annotations

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    predicted = logits.argmax(1)
    f1s = []
    for c in range(num_classes):
        tp = np.sum((predicted == c) & (labels == c))
        fp = np.sum((predicted == c) & (labels != c))
        fn = np.sum((predicted != c) & (labels == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predicted == labels)), "macro_f1": float(np.mean(f1s))}


def regression_metrics(outputs: np.ndarray, targets: np.ndarray) -> dict:
    outputs = outputs.reshape(-1)
    pearson = float(np.corrcoef(outputs, targets)[0, 1]) if outputs.std() > 0 and targets.std() > 0 else 0.0
    return {"mse": float(np.mean((outputs - targets) ** 2)), "pearson": pearson}


def task_metrics(logits: np.ndarray, labels: np.ndarray, task: str, num_classes: int) -> dict:
    if task == "regression":
        return regression_metrics(logits, labels)
    return classification_metrics(logits, labels, num_classes)


def primary_metric(task: str) -> tuple[str, bool]:
    """(name, higher_is_better) used to pick the best epoch."""
    return ("pearson", True) if task == "regression" else ("accuracy", True)
