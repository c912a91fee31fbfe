"""Ray's job-submission token is a password: its file must be readable by its owner only."""

import os
import stat

from pipeline.cluster import protect_auth_token


def test_a_world_readable_token_file_is_made_private(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("secret")
    os.chmod(token, 0o644)
    assert protect_auth_token(str(token)) is True
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert protect_auth_token(str(token)) is False  # already private: left alone
    assert token.read_text() == "secret"


def test_no_token_file_is_not_an_error(tmp_path):
    assert protect_auth_token(str(tmp_path / "absent")) is False
