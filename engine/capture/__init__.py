"""Per-sample training dynamics from a forward pass: the one capture function (``dynamics``), the
``Recorder`` for any PyTorch loop and ``import_logits`` for logits saved by any framework.
"""
