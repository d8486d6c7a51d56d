"""Difficulty scores over captured dynamics: the score registry (what each column means, which end is
suspicious), the extra scores computed on demand, predefined scores from a CSV, rank correlations,
the noise estimate, detection metrics and the label confusion counts.
"""
