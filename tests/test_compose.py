"""docker-compose.yml and the Dockerfile name only things that exist (no Docker engine needed)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
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
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly" in redis_command and "noeviction" in redis_command
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


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, from ``env``."""

    def one(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, value)


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_the_environment_builds_valid_settings(monkeypatch):
    secrets = {name: f"s3cret-{name.lower()}" for name in env_example()}
    secrets["FLOWER_BASIC_AUTH"] = "admin:s3cret"
    for key, value in compose()["x-calq-env"].items():
        monkeypatch.setenv(key, _interpolate(str(value), secrets))
    settings = Settings()
    assert not settings.embedded and settings.storage_url == "s3://calq/store"
    assert settings.s3.endpoint_url == "http://minio:9000"
    assert settings.s3.access_key_id == secrets["MINIO_WORKER_ACCESS_KEY"]
    assert settings.broker() == f"redis://worker:{secrets['REDIS_WORKER_PASSWORD']}@redis:6379/0"
    assert secrets["REDIS_WORKER_PASSWORD"] not in json.dumps(settings.public())


# -- hardening (issue 8) ---------------------------------------------------------

SECRETS = ("REDIS_WORKER_PASSWORD", "REDIS_API_PASSWORD", "REDIS_OPERATOR_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
           "MINIO_WORKER_ACCESS_KEY", "MINIO_WORKER_SECRET_KEY", "MINIO_API_ACCESS_KEY", "MINIO_API_SECRET_KEY",
           "FLOWER_BASIC_AUTH", "GRAFANA_ADMIN_PASSWORD")


def _variables(obj) -> set[str]:
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", json.dumps(obj)))


def _host_ports(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_every_secret_is_required_from_the_env_file_and_listed_in_env_example():
    text = (ROOT / "docker-compose.yml").read_text()
    example = env_example()
    for name in SECRETS:
        assert name in example and example[name] == "", f"{name} must be in .env.example, empty"
        uses = re.findall(r"\$\{" + name + r"(:[-?])?[^}]*\}", text)
        assert uses and all(op == ":?" for op in uses), f"{name} must be required (${{{name}:?...}}), never defaulted"
    assert "calq-secret" not in text and "minioadmin" not in text
    referenced = _variables(compose())
    documented = set(example) | {
        m for m in re.findall(r"^# ([A-Z_]+)=", (ROOT / ".env.example").read_text(), flags=re.M)
    }
    assert referenced <= documented, f"not in .env.example: {referenced - documented}"
    readme = (ROOT / "README.md").read_text()
    assert ".env.example" in readme


def test_redis_runs_with_calq_acl_users_and_every_port_is_on_localhost_only():
    services = compose()["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "--aclfile /acl/users.acl" in redis_command and "redis-acl:/acl:ro" in services["redis"]["volumes"]
    assert services["redis-acl"]["command"] == ["acl", "--out", "/acl/users.acl"]
    assert "$$REDIS_OPERATOR_PASSWORD" in " ".join(services["redis"]["healthcheck"]["test"])
    for name, service in services.items():
        for port in _host_ports(service):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    assert compose()["x-calq-env"]["CALQ_BROKER_URL"].startswith("redis://worker:${REDIS_WORKER_PASSWORD")
    assert services["api"]["environment"]["CALQ_BROKER_URL"].startswith("redis://api:${REDIS_API_PASSWORD")


def test_producers_reach_only_the_api_and_the_api_writes_datasets_only():
    services = compose()["services"]
    assert not _host_ports(services["redis"]) and not _host_ports(services["minio"])  # not reachable from the host
    assert _host_ports(services["api"]) == ["127.0.0.1:8000:8000"]
    api_env = services["api"]["environment"]
    assert "MINIO_API_ACCESS_KEY" in api_env["CALQ_S3__ACCESS_KEY_ID"] and "MINIO_WORKER" not in json.dumps(api_env)
    init = services["minio-init"]["entrypoint"][-1]
    policy = json.loads(re.search(r"<<'APIPOLICY'\n(.*?)\n\s*APIPOLICY", init, flags=re.S).group(1))
    writes = {r for st in policy["Statement"] if "s3:PutObject" in st["Action"] for r in st["Resource"]}
    assert writes == {"arn:aws:s3:::calq/store/datasets/*"}
    assert not [st for st in policy["Statement"] if "s3:DeleteObject" in st["Action"]]


def test_workers_use_a_bucket_limited_service_account_never_minio_root():
    services = compose()["services"]
    env = compose()["x-calq-env"]
    assert "MINIO_ROOT" not in json.dumps(env)
    assert "MINIO_WORKER_ACCESS_KEY" in env["CALQ_S3__ACCESS_KEY_ID"]
    assert "MINIO_WORKER_SECRET_KEY" in env["CALQ_S3__SECRET_ACCESS_KEY"]
    for name, service in services.items():
        if name in ("minio", "minio-init"):
            continue
        assert "MINIO_ROOT" not in json.dumps(service.get("environment", {})), name
    init = services["minio-init"]["entrypoint"][-1]
    policy = json.loads(re.search(r"<<'POLICY'\n(.*?)\n\s*POLICY", init, flags=re.S).group(1))
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::calq", "arn:aws:s3:::calq/*"}
    assert "mc admin user add" in init and "mc admin policy attach" in init


def test_flower_has_basic_auth_and_no_storage_secret():
    flower = compose()["services"]["flower"]
    env = flower["environment"]
    assert "FLOWER_BASIC_AUTH" in env
    assert not [k for k in env if k.startswith("CALQ_S3") or "SECRET" in k or "MINIO" in k]
    assert set(k for k in env if k.startswith("CALQ_")) <= {"CALQ_BROKER_URL", "CALQ_DEFAULT_QUEUE"}


def test_images_are_pinned_containers_are_not_root_and_workers_have_memory_limits():
    services = compose()["services"]
    for name, service in services.items():
        image = service.get("image", "")
        if "build" in service:
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"{name}: {image!r}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, flags=re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim", base), base
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    for name in ("worker-cpu", "worker-gpu"):
        limit = services[name]["deploy"]["resources"]["limits"]["memory"]
        assert re.fullmatch(r"\$\{CALQ_WORKER_MEMORY:-\d+[mg]\}|\d+[mg]", limit), limit
    for name in ("flower", "worker-cpu", "worker-gpu"):
        assert "no-new-privileges:true" in services[name]["security_opt"], name


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


# -- seeing the fleet (issue 20) ---------------------------------------------------

DEPLOY = ROOT / "deploy"
#: Prometheus's own series a query may name besides calq's.
PROMETHEUS_SERIES = {"up"}
#: Labels every query may use besides a calq metric's own: histogram buckets, and Prometheus's target labels.
TARGET_LABELS = {"le", "job", "instance"}
_PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "deriv", "delta", "absent",
                 "histogram_quantile", "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "bool",
                 "offset"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "calq.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def _names_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """The series names a PromQL expression reads, and the labels it matches or groups by."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    labels = set(re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", no_strings))
    labels = {name.strip() for group in labels for name in group.split(",") if name.strip()}
    labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", expr))
    stripped = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", no_strings)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped))
    return {w for w in words if w not in _PROMQL_WORDS}, labels


def test_every_dashboard_and_alert_query_names_a_metric_the_code_exports():
    from shared.jobs.metrics import EXPORTED, METRICS

    queries = dashboard_queries() + [rule["expr"] for rule in alert_rules()]
    assert len(queries) >= 10
    named: set[str] = set()
    for expr in queries:
        series, labels = _names_and_labels(expr)
        assert series, f"{expr!r} names no series"
        assert series <= EXPORTED | PROMETHEUS_SERIES, f"{expr!r} names {series - EXPORTED - PROMETHEUS_SERIES}"
        own = {label for name in series for base in (name.removesuffix(s) for s in ("_bucket", "_sum", "_count"))
               if base in METRICS for label in METRICS[base][1]}
        assert labels <= own | TARGET_LABELS, f"{expr!r} uses labels {labels - own - TARGET_LABELS}"
        named |= {name for name in series if name in EXPORTED}
    # the dashboard shows what the issue asks for
    dashboard = " ".join(dashboard_queries())
    for metric in ("calq_queue_depth", "calq_worker_busy", "calq_jobs_finished_total", "calq_job_seconds_bucket",
                   "calq_remedies_total", "calq_divergences_total", "calq_leases_reaped_total", "calq_handbacks_total"):
        assert metric in dashboard, metric


def test_the_query_checker_catches_a_misnamed_metric_and_label():
    from shared.jobs.metrics import EXPORTED

    series, labels = _names_and_labels('sum by (queue) (rate(calq_job_finished_total{state="failed"}[5m]))')
    assert series == {"calq_job_finished_total"} and not series <= EXPORTED
    assert labels == {"queue", "state"}


def test_the_alerts_cover_workers_queues_failures_and_reaps():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {"CalqWorkerDown", "CalqQueueGrowing", "CalqFailureRateHigh", "CalqLeaseReapsHigh"} <= set(rules)
    assert rules["CalqQueueGrowing"]["for"] == "15m" and "calq_queue_depth" in rules["CalqQueueGrowing"]["expr"]
    for rule in rules.values():
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in ("page", "warn")


def test_prometheus_and_grafana_are_provisioned_from_files_that_exist():
    from shared.contract.settings import MetricsSettings

    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
        assert "no-new-privileges:true" in service["security_opt"], name
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["dns_sd_configs"][0]
    assert set(target["names"]) == {"worker-cpu", "worker-gpu"}
    assert target["port"] == MetricsSettings().port  # the port each supervisor serves by default
    assert scrape["rule_files"] == ["/etc/prometheus/alerts.yml"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "calq.json").read_text())
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    assert uids == {source["datasources"][0]["uid"]}



def test_the_dashboard_renderer_agrees_with_prometheus_on_known_values():
    """tests/dashboard.py (which renders the panels from real scrapes in test_metrics_fleet) on hand-made scrapes."""
    from tests.dashboard import Scrapes, _Parser

    def buckets(counts, **labels):
        les = ("1.0", "5.0", "10.0", "+Inf")
        return {("calq_job_seconds_bucket", tuple(sorted({**labels, "le": le}.items()))): c for le, c in zip(les, counts)}

    first = {**buckets([0, 0, 0, 0], phase="sample"),
             ("calq_jobs_finished_total", (("state", "failed"),)): 2.0,
             ("calq_jobs_finished_total", (("state", "succeeded"),)): 10.0}
    second = {**buckets([2, 6, 10, 10], phase="sample"),
              ("calq_jobs_finished_total", (("state", "failed"),)): 5.0,
              ("calq_jobs_finished_total", (("state", "succeeded"),)): 16.0}
    scrapes = Scrapes(first, second, 60.0)

    def run(expr):
        return _Parser(expr, scrapes).parse()

    # 10 observations: 2 ≤ 1 s, 4 in (1, 5], 4 in (5, 10]; the median's rank 5 is 3/4 into (1, 5]
    assert run("histogram_quantile(0.5, sum by (le, phase) (rate(calq_job_seconds_bucket[15m])))") == {
        (("phase", "sample"),): pytest.approx(4.0)}
    assert run('sum(rate(calq_jobs_finished_total{state="failed"}[15m])) / sum(rate(calq_jobs_finished_total[15m]))') \
        == {(): pytest.approx(3 / 9)}
    assert run("sum by (state) (rate(calq_jobs_finished_total[5m])) * 60") == {
        (("state", "failed"),): pytest.approx(3.0), (("state", "succeeded"),): pytest.approx(6.0)}
    with pytest.raises(ValueError, match="cannot render"):
        run("topk(3, calq_queue_depth)")
