"""The dashboard's data root: the only folders whose files a path typed into a page may read.

A team shares one dashboard, so a path field must not become a way to read any file the server
can (``/etc/passwd``, a colleague's home, the server's secrets). Every path a page takes from a
user goes through ``resolve_user_path``: it resolves ``~``, ``..`` and symbolic links first, then
accepts the result only inside the data root (``$DIFFICULTY_AUDIT_DATA_ROOT``, default: the folder
the server started in) or the runs folder. The command line is not restricted: whoever runs
``python -m engine`` already reads their own files.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.store.runs import runs_root

DATA_ROOT_ENV = "DIFFICULTY_AUDIT_DATA_ROOT"
_STARTED_IN = Path.cwd()


class PathRefused(ValueError):
    """A typed path leads outside the data root and the runs folder (or is not a usable path at all)."""


def data_root() -> Path:
    """``$DIFFICULTY_AUDIT_DATA_ROOT``, else the folder the server started in; resolved (symlinks followed)."""
    return Path(os.environ.get(DATA_ROOT_ENV) or _STARTED_IN).expanduser().resolve()


def allowed_roots() -> list[Path]:
    """The folders a page may read under: the data root and the runs folder."""
    return [data_root(), runs_root().resolve()]


def resolve_user_path(text: str) -> Path:
    """The absolute, resolved path for a path typed into a page; ``PathRefused`` when it leads elsewhere.

    A relative path is taken relative to the data root. ``..`` and symbolic links are resolved before
    the check, so neither can lead out of the allowed folders. The message says which folders are
    allowed and how to allow another (it never says whether the refused path exists).
    """
    text = (text or "").strip()
    if not text:
        raise PathRefused("no path given")
    if "\x00" in text:
        raise PathRefused("the path contains a NUL character")
    root = data_root()
    p = Path(text).expanduser()
    resolved = (p if p.is_absolute() else root / p).resolve()
    for base in allowed_roots():
        if resolved == base or resolved.is_relative_to(base):
            return resolved
    runs = runs_root().resolve()
    raise PathRefused(
        f"{text!r} is outside the folders this dashboard reads: the data root {root} and the runs folder {runs}. "
        f"Move the data under the data root, or restart the dashboard with {DATA_ROOT_ENV} set to a folder that "
        "contains it (the command line, `python -m engine`, is not restricted)."
    )
