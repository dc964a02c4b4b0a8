"""Reports of paper artifacts: our results beside the paper's, in md, csv, tex and html."""

from bench.report.tables import aggregate, paired_deltas, render, write_all

__all__ = ["aggregate", "paired_deltas", "render", "write_all"]
