"""Who may do what in the dashboard: roles from the signed-in user and the ``[roles]`` configuration.

Pure functions over plain dicts (no Streamlit): the pages pass ``st.user`` (Streamlit's OpenID Connect
sign-in, configured in the ``[auth]`` section of ``.streamlit/secrets.toml``) and the ``[roles]`` section
of the same file::

    [roles]
    admins = ["lead@example.com"]                  # start, resume, cancel, delete audits, compute scores, review
    reviewers = ["@example.com", "guest@other.org"]  # review only; "@domain" matches a whole domain

Without an ``[auth]`` section the dashboard is in local mode: everyone who reaches it is an admin (put
it behind an authenticating reverse proxy when it is shared). With sign-in but no ``[roles]``, every
signed-in user is an admin. With ``[roles]``, a signed-in user listed nowhere may not use the dashboard.
"""

from __future__ import annotations

from collections.abc import Mapping

ADMIN, REVIEWER, NOBODY, SIGNED_OUT = "admin", "reviewer", "nobody", "signed out"
ACTIONS = {
    "review": (ADMIN, REVIEWER),  # record review decisions, export
    "run audits": (ADMIN,),  # start, resume, cancel audits; compute extra scores
    "delete audits": (ADMIN,),  # delete a run directory (engine.store.runs.delete_run)
}


def sign_in_configured(user: Mapping) -> bool:
    """Whether Streamlit's sign-in is set up: ``st.user`` then always has ``is_logged_in``."""
    return "is_logged_in" in user


def identity(user: Mapping) -> str | None:
    """The signed-in user's email (else name, else subject), or None when nobody is signed in."""
    if not user.get("is_logged_in"):
        return None
    for key in ("email", "name", "sub"):
        if user.get(key):
            return str(user[key])
    return None


def _listed(email: str, entries) -> bool:
    email = email.strip().lower()
    for e in entries or ():
        e = str(e).strip().lower()
        if e == email or e == "*" or (e.startswith("@") and email.endswith(e)):
            return True
    return False


def role_of(user: Mapping, roles: Mapping | None = None) -> str:
    """``admin``, ``reviewer``, ``nobody`` (signed in, listed nowhere) or ``signed out`` (sign-in required).

    ``user`` is ``st.user`` as a dict; ``roles`` the ``[roles]`` section (``admins``, ``reviewers``: lists of
    emails or ``@domain``), or None.
    """
    if not sign_in_configured(user):
        return ADMIN  # local mode: access is whatever reaches the server (see README, Trust model)
    who = identity(user)
    if who is None:
        return SIGNED_OUT
    if not roles or not (roles.get("admins") or roles.get("reviewers")):
        return ADMIN
    if _listed(who, roles.get("admins")):
        return ADMIN
    if _listed(who, roles.get("reviewers")):
        return REVIEWER
    return NOBODY


def may(role: str, action: str) -> bool:
    """Whether ``role`` may do ``action`` (a key of ``ACTIONS``)."""
    if action not in ACTIONS:
        raise KeyError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    return role in ACTIONS[action]


def reviewer_name(user: Mapping, typed: str | None) -> str | None:
    """The reviewer recorded with a decision: the signed-in identity when there is one, else the typed name."""
    return identity(user) or ((typed or "").strip() or None)
