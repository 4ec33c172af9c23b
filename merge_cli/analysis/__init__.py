"""Task-vector analysis: streamed statistics (stats.py), the analyze pass (analyze.py), findings (findings.py)."""

from merge_cli.analysis.stats import TOP_SHARES, Acc, top_mass

__all__ = ["TOP_SHARES", "Acc", "top_mass"]
