"""Result files in BackdoorBench's formats, each written atomically (temp file in the same folder, then
os.replace), so a reader never sees half a file. Shared by every defense the plugin runs.

- `<m>_df.csv`: one row per epoch, pandas-style (an unnamed index column first), as BackdoorBench's
  `Metric_Aggregator.to_dataframe().to_csv()` writes it; NaN is written as `nan_value`.
- `<m>_df_summary.csv`: rows `last`, `valid_max`, `exist_nan_value` over the same columns.
- `acc_like_metric_plots.png`, `loss_metric_plots.png`: curves over epochs.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..files import (OutputNotWritable, StagedFolder, atomic_path, ensure_writable, torch_save, write_bytes,  # noqa: F401
                     write_json, write_text)

NAN = "nan_value"
ACC_LIKE = {"test_acc": "Test C-Acc", "test_asr": "Test ASR", "test_ra": "Test RA"}
LOSSES = {"train_epoch_loss_avg_over_batch": "Train Loss", "clean_test_loss_avg_over_batch": "Test Clean Loss",
          "bd_test_loss_avg_over_batch": "Test Backdoor Loss"}


def write_index(path: str | os.PathLike, index: Sequence[int]) -> Path:
    """The reserved-set indices, one integer a line (as `np.savetxt(path, index, fmt='%d')`)."""
    buffer = io.BytesIO()
    np.savetxt(buffer, np.asarray(index, dtype=np.int64).reshape(-1), fmt="%d")
    return write_bytes(path, buffer.getvalue())


# --- metric tables ----------------------------------------------------------------------------------

def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _cell(value) -> str:
    if value is None:
        return ""
    if _is_nan(value):
        return NAN
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def columns_of(rows: Sequence[Mapping]) -> List[str]:
    """Column names in first-seen order over all rows."""
    columns: Dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def _csv_text(header: Sequence[str], body: Sequence[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", *header])
    for label, values in body:
        writer.writerow([label, *(_cell(v) for v in values)])
    return buffer.getvalue()


def write_metric_table(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
    """`<m>_df.csv`: index column 0..n-1, then one column per metric."""
    columns = columns_of(rows)
    body = [(i, [row.get(c) for c in columns]) for i, row in enumerate(rows)]
    return write_text(path, _csv_text(columns, body))


def summarize_table(rows: Sequence[Mapping]) -> Dict[str, Dict[str, object]]:
    """Per column: `last` non-missing value, `valid_max` over numbers that are not NaN, `exist_nan_value`."""
    summary: Dict[str, Dict[str, object]] = {"last": {}, "valid_max": {}, "exist_nan_value": {}}
    for column in columns_of(rows):
        values = [row.get(column) for row in rows if row.get(column) is not None]
        numbers = [v for v in values if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                   and not _is_nan(v)]
        summary["last"][column] = values[-1] if values else None
        summary["valid_max"][column] = max(numbers) if numbers else float("nan")
        summary["exist_nan_value"][column] = any(_is_nan(v) for v in values)
    return summary


def write_summary_table(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
    """`<m>_df_summary.csv`: rows `last`, `valid_max`, `exist_nan_value`."""
    columns = columns_of(rows)
    summary = summarize_table(rows)
    body = [(name, [summary[name][c] for c in columns]) for name in ("last", "valid_max", "exist_nan_value")]
    return write_text(path, _csv_text(columns, body))


# --- plots ------------------------------------------------------------------------------------------

def plot_curves(path: str | os.PathLike, curves: Mapping[str, Sequence[float]], ylabel: str,
                ylim: Optional[tuple] = None, title: str = "Results") -> Path:
    """One line per curve against the epoch (0-based), saved as PNG (BackdoorBench's plot layout)."""
    return plot_panels(path, [(title, curves, ylabel, ylim)], figsize=(12.8, 9.6))


def plot_panels(path: str | os.PathLike, panels: Sequence[tuple], figsize: tuple = (12.8, 9.6)) -> Path:
    """Side-by-side panels `(title, {label: values}, ylabel, ylim)`, one line per curve against the epoch
    (0-based), saved as PNG. Uses matplotlib's Agg canvas directly, so the caller's pyplot backend is left
    alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    styles = ["--", "-", "-.", ":"]
    markers = ["o", "v", "+", "x"]
    for index, (title, curves, ylabel, ylim) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for i, (label, values) in enumerate(curves.items()):
            values = [float("nan") if v is None else float(v) for v in values]
            axes.plot(range(len(values)), values, label=label, linewidth=2,
                      linestyle=styles[i % len(styles)], marker=markers[i % len(markers)])
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set(xlabel="Epochs", ylabel=ylabel, title=title)
        if ylim is not None:
            axes.set_ylim(*ylim)
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_bytes(path, buffer.getvalue())


def plot_metrics(folder: str | os.PathLike, rows: Sequence[Mapping]) -> List[Path]:
    """BackdoorBench's two standard plots from per-epoch rows: ACC/ASR/RA and the three losses."""
    folder = Path(folder)

    def curves(names: Mapping[str, str]) -> Dict[str, List]:
        return {label: [row.get(key) for row in rows] for key, label in names.items()
                if any(row.get(key) is not None for row in rows)}

    losses = curves(LOSSES)
    finite = [v for values in losses.values() for v in values if v is not None and math.isfinite(v)]
    ylim = None  # from 0 like BackdoorBench, unless a loss is negative (D3's objective can be)
    if finite and max(finite) > 0:
        ylim = (min(0.0, min(finite) * 1.05), max(finite) * 1.05)
    return [plot_curves(folder / "acc_like_metric_plots.png", curves(ACC_LIKE), "ACC", ylim=(0, 1)),
            plot_curves(folder / "loss_metric_plots.png", losses, "Loss", ylim=ylim)]


def epoch_row(history_row: Mapping[str, float]) -> Dict[str, Optional[float]]:
    """A defense's history row → BackdoorBench's per-epoch columns (epoch counted from 0). An epoch that was
    not evaluated (--eval_every) keeps its training loss; its test columns are None (empty cells)."""
    evaluated = "acc" in history_row  # else "clean_loss" is the training clean loss, not the test loss
    test = history_row.get if evaluated else (lambda key: None)
    return {"epoch": int(history_row["epoch"]) - 1,
            "train_epoch_loss_avg_over_batch": history_row.get("loss"),
            "clean_test_loss_avg_over_batch": test("clean_loss"),
            "bd_test_loss_avg_over_batch": test("bd_loss"),
            "test_acc": test("acc"), "test_asr": test("asr"), "test_ra": test("ra")}
