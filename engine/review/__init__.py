"""From scores to verdicts: the saved review policy (the one function that decides flags), reviewers'
decisions in SQLite, exports and the cleaned dataset.
"""
