"""Our own training loop: the audit config, the models, the loop that captures every sample's dynamics,
the audit that prepares, trains, scores and finalises a run, DDP helpers, and retraining on cleaned data.
"""
