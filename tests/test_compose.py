"""docker-compose.yml and the Dockerfile name only things that exist (no Docker engine needed)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

from producer.cli import app
from shared.contract.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def cli_commands() -> set[str]:
    return {c.name or c.callback.__name__ for c in app.registered_commands}


def test_services_are_the_fleet():
    services = compose()["services"]
    assert {"redis", "minio", "minio-init", "flower", "worker-cpu", "worker-gpu"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "noeviction" in services["redis"]["command"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "mc mb" in services["minio-init"]["entrypoint"][-1]


def test_every_calq_command_and_module_exists():
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue
        entrypoint = service.get("entrypoint")
        if entrypoint and entrypoint[0] == "celery":
            module = entrypoint[entrypoint.index("-A") + 1]
            importlib.import_module(module)
        else:
            command = service["command"]
            assert command[0] in cli_commands(), name
            if command[0] == "worker":
                assert command[1] == "--gpus" and command[2] in ("none", "auto"), name


def test_every_calq_variable_is_a_setting():
    fields = set(Settings.model_fields)
    for name, service in compose()["services"].items():
        for key in (service.get("environment") or {}):
            if key.startswith("CALQ_"):
                top = key.removeprefix("CALQ_").lower().split("__")[0]
                assert top in fields, f"{name}: {key} is not a calq setting"


def test_the_environment_builds_valid_settings(monkeypatch):
    env = compose()["x-calq-env"]
    for key, value in env.items():
        monkeypatch.setenv(key, re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value)))
    settings = Settings()
    assert not settings.embedded and settings.storage_url == "s3://calq/store"
    assert settings.s3.endpoint_url == "http://minio:9000"


def test_dockerfile_copies_what_exists_and_installs_the_cli():
    text = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["calq"]' in text
    extras = re.findall(r"EXTRAS: \"([^\"]+)\"", (ROOT / "docker-compose.yml").read_text())
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for group in extras:
        assert set(group.split(",")) <= declared
