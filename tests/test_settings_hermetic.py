"""A developer's environment never leaks into a test (see conftest.py)."""

import os

from shared.contract.settings import Settings


def test_no_calq_variable_reaches_the_tests():
    assert not [name for name in os.environ if name.startswith("CALQ_")]


def test_a_dotenv_in_the_working_directory_is_ignored(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("CALQ_BROKER_URL=redis://somewhere:6379/0\nCALQ_DEFAULT_QUEUE=calq.gpu\n")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.embedded and settings.default_queue == "calq.cpu"
