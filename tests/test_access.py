"""Sign-in roles: pure role rules over a user dict and the [roles] config, and the pages under a faked st.user."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.jobs.access import ADMIN, NOBODY, REVIEWER, SIGNED_OUT, may, reviewer_name, role_of

APP = str(Path(__file__).resolve().parent.parent / "app.py")
ROLES = {"admins": ["Lead@Example.com"], "reviewers": ["@example.com", "guest@other.org"]}


def _signed_in(email: str) -> dict:
    return {"is_logged_in": True, "email": email, "name": email.split("@")[0]}


@pytest.mark.parametrize("user, roles, role", [
    ({}, ROLES, ADMIN),  # no [auth]: local mode, access is whatever reaches the server
    ({"email": "x@y"}, ROLES, ADMIN),  # st.user without sign-in configured has no is_logged_in
    ({"is_logged_in": False}, ROLES, SIGNED_OUT),
    (_signed_in("lead@example.com"), ROLES, ADMIN),  # emails compare case-insensitively
    (_signed_in("ana@example.com"), ROLES, REVIEWER),  # @domain entry
    (_signed_in("guest@other.org"), ROLES, REVIEWER),
    (_signed_in("eve@evil.org"), ROLES, NOBODY),
    (_signed_in("eve@notexample.com"), ROLES, NOBODY),  # "@example.com" is not a suffix match on the name
    (_signed_in("eve@evil.org"), None, ADMIN),  # sign-in without [roles]: every signed-in user
])
def test_roles(user, roles, role):
    assert role_of(user, roles) == role


def test_what_each_role_may_do():
    assert may(ADMIN, "run audits") and may(ADMIN, "review")
    assert may(REVIEWER, "review") and not may(REVIEWER, "run audits")
    assert not may(NOBODY, "review") and not may(SIGNED_OUT, "review")


def test_the_reviewer_of_a_decision_is_the_signed_in_user():
    assert reviewer_name(_signed_in("ana@example.com"), "someone else") == "ana@example.com"
    assert reviewer_name({}, " typed ") == "typed"
    assert reviewer_name({"is_logged_in": False}, "") is None


def _app(monkeypatch, tmp_path, user: dict) -> AppTest:
    monkeypatch.setenv("DIFFICULTY_AUDIT_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.user = user
    at.secrets = {"roles": ROLES}
    return at.run()


def test_a_reviewer_cannot_start_an_audit(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path, _signed_in("ana@example.com"))
    assert not at.exception, at.exception
    start = next(b for b in at.button if b.label == "Start audit")
    assert start.disabled  # (AppTest, like a browser, refuses to click a disabled button)
    assert any("ana@example.com" in c.value.replace("\\", "") and "reviewer" in c.value for c in at.sidebar.caption)


def test_an_admin_can_start_and_strangers_and_the_signed_out_cannot_enter(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path, _signed_in("lead@example.com"))
    assert not next(b for b in at.button if b.label == "Start audit").disabled
    at = _app(monkeypatch, tmp_path, _signed_in("eve@evil.org"))
    assert any("not listed" in e.value for e in at.error)
    assert not any(b.label == "Start audit" for b in at.button)
    at = _app(monkeypatch, tmp_path, {"is_logged_in": False})
    assert [b.label for b in at.button] == ["Sign in"]


def test_sign_in_works_from_a_fresh_install_when_configured(monkeypatch, tmp_path):
    """st.login needs Authlib (``streamlit[auth]`` in pyproject.toml): without it the Sign in button raised
    StreamlitMissingAuthlibError. A real ``[auth]`` section in a secrets file (no identity provider is contacted:
    the button only sends the browser to the login route)."""
    from streamlit import config
    from streamlit.runtime.secrets import secrets_singleton

    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[auth]\nredirect_uri = "http://localhost:8501/oauth2callback"\n'
                       f'cookie_secret = "{"c" * 40}"\nclient_id = "difficulty-audit"\nclient_secret = "s"\n'
                       'server_metadata_url = "https://idp.example.com/.well-known/openid-configuration"\n')
    before = config.get_option("secrets.files")
    config.set_option("secrets.files", [str(secrets)])
    secrets_singleton._reset()
    try:
        at = _app(monkeypatch, tmp_path, {"is_logged_in": False})
        (sign_in,) = at.button
        sign_in.click().run()
        assert not at.exception, at.exception[0].message
    finally:
        config.set_option("secrets.files", before)
        secrets_singleton._reset()
