"""Figures, tables, comparisons and HTML reports, read from the results store (never retraining)."""
