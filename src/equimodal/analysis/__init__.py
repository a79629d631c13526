"""Comparing runs: the benchmark grid, statistics over seeds, plots."""
from .bench import BenchRun, parse_method_spec, run_grid, summarise
from .stats import mean_std, paired_difference

__all__ = ["BenchRun", "parse_method_spec", "run_grid", "summarise", "mean_std", "paired_difference"]
