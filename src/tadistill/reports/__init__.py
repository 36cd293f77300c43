"""Reports: result tables (JSON, CSV, Markdown with retention) and study figures (PNG)."""

from __future__ import annotations

from tadistill.reports.plots import plot_score_vs_latency, plot_score_vs_params, plot_training_curves, read_curve
from tadistill.reports.tables import markdown_table, order_columns, retention, study_table, write_results

__all__ = [
    "markdown_table",
    "order_columns",
    "plot_score_vs_latency",
    "plot_score_vs_params",
    "plot_training_curves",
    "read_curve",
    "retention",
    "study_table",
    "write_results",
]
