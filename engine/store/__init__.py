"""The run store: a run directory and its files (``runs``) and plot-ready summaries of a run (``views``).
"""
