"""The Helm chart: lint, render, validate against Kubernetes 1.30, and the points that matter."""

from __future__ import annotations

import base64
import json
import math
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

# Chart.render() does not expose the api_versions/kube_version options of the native render
# call (the `helm template --api-versions/--kube-version` equivalents), so the tests call it
# directly; an unknown option key makes the library raise, so a rename cannot pass silently.
from helm_python import _native

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "chat-worker"
DASHBOARD = CHART / "dashboards" / "chat-worker.json"

KUBE_VERSION = "1.30.0"
KEDA_API = "keda.sh/v1alpha1"
MONITORING_API = "monitoring.coreos.com/v1"
RELEASE, NAMESPACE = "demo", "llm"
FULLNAME = "demo-chat-worker"

FAKE_API_KEY = "sk-fake-DO-NOT-LEAK-8c1f2e9d"
FAKE_AMQP_URL = "amqp://worker:pw-DO-NOT-LEAK-41b7@rabbitmq.mq:5672/"
SECRETS = {"secrets": {"upstreamApiKey": FAKE_API_KEY, "amqpUrl": FAKE_AMQP_URL}}

# Custom resources: no built-in schema, so their structure is asserted below instead.
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}

# Contract §2: the settings the ConfigMap carries, and the secrets it must never carry.
SECRET_SETTINGS = {"WORKER_UPSTREAM_API_KEY", "WORKER_AMQP_URL"}
CONFIG_SETTINGS = {
    "WORKER_UPSTREAM_BASE_URL",
    "WORKER_REQUEST_QUEUE",
    "WORKER_RESULT_EXCHANGE",
    "WORKER_RESULT_QUEUE",
    "WORKER_DEAD_LETTER_QUEUE",
    "WORKER_QUEUE_TYPE",
    "WORKER_CONCURRENCY",
    "WORKER_MAX_ATTEMPTS",
    "WORKER_REQUEST_TIMEOUT",
    "WORKER_STREAM_IDLE_TIMEOUT",
    "WORKER_STREAM_FLUSH_INTERVAL",
    "WORKER_SHUTDOWN_GRACE",
    "WORKER_CONSUMER_TIMEOUT",
    "WORKER_PUBLISH_RETRY_WINDOW",
    "WORKER_AMQP_HEARTBEAT",
    "WORKER_ALLOWED_MODELS",
    "WORKER_REPLY_TO_PATTERN",
    "WORKER_MAX_MESSAGE_BYTES",
    "WORKER_HTTP_PORT",
    "WORKER_LOG_FORMAT",
    "WORKER_LOG_LEVEL",
    "WORKER_EVENTS",
    "WORKER_EVENTS_EXCHANGE",
    "WORKER_TRUST_TENANT_HEADER",
}

# Metric names the dashboard queries; keep in step with the worker's telemetry.
DASHBOARD_METRICS = {
    "chat_worker_jobs_total",
    "chat_worker_jobs_in_flight",
    "chat_worker_retries_total",
    "chat_worker_dead_lettered_total",
    "chat_worker_job_duration_seconds_bucket",
    "gen_ai_client_operation_duration_seconds_bucket",
    "gen_ai_client_operation_duration_seconds_count",
    "gen_ai_client_operation_time_to_first_chunk_seconds_bucket",
    "gen_ai_client_token_usage_sum",
    "chat_worker_tokens_total",
}


@dataclass(frozen=True)
class Rendered:
    """The manifests of one render, and every rendered file's text (NOTES.txt included)."""

    docs: list[dict[str, Any]]
    text: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    def kinds(self) -> set[str]:
        return {doc["kind"] for doc in self.docs}

    def config_map(self) -> dict[str, Any]:
        return next(d for d in self.of_kind("ConfigMap") if d["metadata"]["name"] == FULLNAME)

    def pod_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    def container(self) -> dict[str, Any]:
        (container,) = self.pod_spec()["containers"]
        return container

    def pod_annotations(self) -> dict[str, str]:
        metadata = self.one("Deployment")["spec"]["template"]["metadata"]
        return dict(metadata.get("annotations") or {})


def render(values: Mapping[str, Any] | None = None, *, apis: Iterable[str] = ()) -> Rendered:
    """`helm template` with the given values and extra API versions, for Kubernetes 1.30."""
    options = {
        "name": RELEASE,
        "namespace": NAMESPACE,
        "kube_version": f"v{KUBE_VERSION}",
        "api_versions": list(apis),
        "is_install": True,
    }
    with helm.Chart.load(CHART) as chart:
        raw = _native.call_string(
            "helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options)
        )
    files: dict[str, str] = json.loads(raw)
    docs = [
        doc
        for name, text in sorted(files.items())
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return Rendered(docs=docs, text="\n".join(files.values()))


def lint(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return helm.lint(CHART, dict(values or {}), strict=True, kube_version=f"v{KUBE_VERSION}")


def merge(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge value dictionaries, later ones winning."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def env_of(container: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


UPSTREAMS = {
    "upstreams": [
        {
            "name": "openai",
            "base_url": "https://api.openai.com/v1",
            "api_key_env": "OPENAI_API_KEY",
            "models": ["gpt-4o-mini", "gpt-4o"],
            "limits": {"rpm": 3000, "tpm": 1000000},
        },
        {
            "name": "azure",
            "base_url": "https://example.openai.azure.com/openai/deployments/gpt-4o-mini",
            "auth": "api-key",
            "api_key_env": "AZURE_OPENAI_KEY",
            "query": {"api-version": "2024-10-21"},
            "models": ["gpt-4o-mini"],
            "model_map": {"fast": "gpt-4o-mini"},
            "priority": 1,
            "weight": 2,
            "cooldown": {"failures": 5, "seconds": 10},
        },
        {
            "name": "vllm",
            "base_url": "http://vllm:8000/v1",
            "auth": "none",
            "models": ["*"],
            "endpoints": ["chat"],
        },
    ],
    "upstreamKeys": [
        {"name": "OPENAI_API_KEY", "secretName": "llm-keys", "secretKey": "openai"},
        {"name": "AZURE_OPENAI_KEY", "secretName": "llm-keys", "secretKey": "azure"},
    ],
}

FAKE_DATABASE_URL = "postgresql://gateway:db-DO-NOT-LEAK-77c2@postgres.db:5432/gateway"
GATEWAY_POSTGRES: dict[str, Any] = {
    "gateway": {
        "enabled": True,
        "database": {"url": FAKE_DATABASE_URL},
        "keys": {"existingSecret": "gateway-keys"},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5},
        "maxFileBytes": 104857600,
        "lane": "chat.interactive",
        "batchLane": "chat.batch",
    },
}

SCENARIOS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "defaults": ({}, ()),
    "upstreams": (merge(SECRETS, UPSTREAMS), (KEDA_API,)),
    "keda": (SECRETS, (KEDA_API,)),
    "keda-api-absent": (SECRETS, ()),
    "keda-switched-off": (
        merge(SECRETS, {"autoscaling": {"keda": {"enabled": False}}}),
        (KEDA_API,),
    ),
    "existing-secret": ({"secrets": {"existingSecret": "llm-credentials"}}, (KEDA_API,)),
    "service-monitor": (
        {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        (MONITORING_API,),
    ),
    "dashboard": ({"dashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}}}, ()),
    "console": (merge(SECRETS, {"console": {"enabled": True, "token": "t0ken"}}), (KEDA_API,)),
    "console-existing-secret": (
        {
            "secrets": {"existingSecret": "llm-credentials"},
            "console": {"enabled": True, "existingSecret": "console-token"},
        },
        (),
    ),
    "gateway": (merge(SECRETS, GATEWAY_POSTGRES), (KEDA_API,)),
    "gateway-existing-secrets": (
        {
            "secrets": {"existingSecret": "llm-credentials"},
            "gateway": {
                "enabled": True,
                "database": {"existingSecret": "gateway-db", "secretKey": "url"},
                "keys": {"existingSecret": "gateway-keys"},
                "persistence": {"existingClaim": "gateway-data"},
            },
        },
        (),
    ),
    "autoscaling-off": (
        merge(SECRETS, {"autoscaling": {"enabled": False}, "replicaCount": 3}),
        (KEDA_API,),
    ),
    "everything": (
        merge(
            SECRETS,
            {
                "config": {
                    "upstreamBaseUrl": "https://llm.example/v1",
                    "allowedModels": ["gpt-4o-mini", "llama-3.1-8b"],
                    "replyToPattern": "^amq\\.gen-.*$",
                    "queueType": "classic",
                    "logFormat": "console",
                },
                "otel": {"exporterOtlpEndpoint": "http://otel-collector:4318"},
                "image": {"digest": "sha256:" + "ab" * 32},
                "imagePullSecrets": [{"name": "regcred"}],
                "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
                "autoscaling": {
                    "minReplicas": 0,
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
                    "keda": {"fallback": {"failureThreshold": 3, "replicas": 2}},
                },
                "podDisruptionBudget": {"minAvailable": 1},
                "serviceMonitor": {"enabled": True},
                "dashboard": {"enabled": True},
                "tolerations": [{"key": "llm", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "batch-low",
            },
        ),
        (KEDA_API, MONITORING_API),
    ),
}


@pytest.fixture(params=sorted(SCENARIOS), ids=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> tuple[dict[str, Any], tuple[str, ...]]:
    return SCENARIOS[request.param]


# --- lint and schema validation of every manifest -------------------------------------------


def test_lint_is_clean(scenario: tuple[dict[str, Any], tuple[str, ...]]) -> None:
    values, _ = scenario
    report = lint(values)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; the only info is "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_manifest_is_valid_for_kubernetes_1_30(
    scenario: tuple[dict[str, Any], tuple[str, ...]],
) -> None:
    values, apis = scenario
    rendered = render(values, apis=apis)
    assert rendered.docs
    for doc in rendered.docs:
        if doc["kind"] in CRD_KINDS:
            continue
        # strict: unknown fields fail too, so a misplaced key cannot slip through.
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_the_validator_is_not_vacuous() -> None:
    deployment = render().one("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container["livenessProbe"]["httpGet"]["port"] = [8080]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_defaults_render_the_core_objects_and_a_cpu_hpa() -> None:
    rendered = render()
    assert rendered.kinds() == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    }
    assert "WARNING: config.upstreamBaseUrl is empty" in rendered.text


# --- the Deployment -------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [30, 120, 7.5, 0])
def test_termination_grace_outlasts_the_shutdown_grace(grace: float) -> None:
    rendered = render({"config": {"shutdownGrace": grace}})
    period = rendered.pod_spec()["terminationGracePeriodSeconds"]
    assert isinstance(period, int)
    assert period > grace
    assert period == math.ceil(grace) + 15
    assert float(rendered.config_map()["data"]["WORKER_SHUTDOWN_GRACE"]) == grace


def test_probes_hit_the_worker_endpoints_on_the_http_port() -> None:
    rendered = render({"config": {"httpPort": 9100}})
    container = rendered.container()
    assert container["ports"] == [{"name": "http", "containerPort": 9100, "protocol": "TCP"}]
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert rendered.config_map()["data"]["WORKER_HTTP_PORT"] == "9100"
    (port,) = rendered.one("Service")["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_pod_runs_locked_down() -> None:
    rendered = render()
    pod = rendered.pod_spec()
    container = rendered.container()
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["runAsUser"] > 0
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == pod["securityContext"]["runAsUser"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert container["args"] == ["run"]


def test_pods_spread_and_the_selectors_match_them() -> None:
    rendered = render()
    deployment = rendered.one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    constraints = rendered.pod_spec()["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    for constraint in constraints:
        assert constraint["labelSelector"]["matchLabels"] == selector
    assert rendered.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert rendered.one("Service")["spec"]["selector"] == selector


def test_chart_app_version_is_the_package_version() -> None:
    """The default image tag is appVersion: it must follow pyproject.toml's version."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]


def test_image_defaults_to_the_app_version_and_prefers_a_digest() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert render().container()["image"] == f"chat-worker:{app_version}"
    digest = "sha256:" + "0f" * 32
    image = render({"image": {"repository": "r.example/cw", "digest": digest}}).container()
    assert image["image"] == f"r.example/cw@{digest}"


# --- settings and secrets -------------------------------------------------------------------


def test_configmap_carries_every_non_secret_setting() -> None:
    rendered = render(
        {
            "config": {
                "upstreamBaseUrl": "https://llm.example/v1",
                "allowedModels": ["gpt-4o-mini", "llama-3.1-8b"],
                "resultQueue": "",
            }
        }
    )
    data = rendered.config_map()["data"]
    assert {key for key in data if key.startswith("WORKER_")} == CONFIG_SETTINGS
    assert data["WORKER_UPSTREAM_BASE_URL"] == "https://llm.example/v1"
    assert data["WORKER_ALLOWED_MODELS"] == "gpt-4o-mini,llama-3.1-8b"
    assert data["WORKER_RESULT_QUEUE"] == ""
    # Values arrive as floats: whole numbers must not turn into 1.048576e+07.
    assert data["WORKER_MAX_MESSAGE_BYTES"] == "10485760"
    assert data["WORKER_CONCURRENCY"] == "64"
    assert data["WORKER_STREAM_FLUSH_INTERVAL"] == "0.05"
    assert data["OTEL_SERVICE_NAME"] == "chat-worker"
    assert all(isinstance(value, str) for value in data.values())
    container = rendered.container()
    assert {"configMapRef": {"name": FULLNAME}} in container["envFrom"]


def test_upstream_base_url_is_left_out_when_unset() -> None:
    assert "WORKER_UPSTREAM_BASE_URL" not in render().config_map()["data"]


def test_upstreams_render_to_a_mounted_file_the_worker_accepts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from worker.settings import Settings

    rendered = render(UPSTREAMS)
    data = rendered.config_map()["data"]
    path = data["WORKER_UPSTREAMS_FILE"]
    (files,) = [
        d for d in rendered.of_kind("ConfigMap") if d["metadata"]["name"] == f"{FULLNAME}-upstreams"
    ]
    text = files["data"]["upstreams.yaml"]
    assert yaml.safe_load(text) == {"upstreams": UPSTREAMS["upstreams"]}
    # The worker reads the rendered file as it is, keys from the variables the pod gets.
    (tmp_path / "upstreams.yaml").write_text(text)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-o")
    monkeypatch.setenv("AZURE_OPENAI_KEY", "az-k")
    settings = Settings(_env_file=None, upstreams_file=tmp_path / "upstreams.yaml")  # type: ignore[call-arg]
    assert [u.name for u in settings.upstreams] == ["openai", "azure", "vllm"]
    assert settings.upstreams[1].query == {"api-version": "2024-10-21"}
    assert settings.upstreams[2].endpoints == ["chat"]

    container = rendered.container()
    mount = next(m for m in container["volumeMounts"] if m["name"] == "upstreams")
    assert mount == {"name": "upstreams", "mountPath": str(Path(path).parent), "readOnly": True}
    volume = next(v for v in rendered.pod_spec()["volumes"] if v["name"] == "upstreams")
    assert volume["configMap"]["name"] == f"{FULLNAME}-upstreams"
    env = env_of(container)
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "llm-keys",
        "key": "openai",
    }
    assert env["AZURE_OPENAI_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "azure"
    assert "checksum/upstreams" in rendered.pod_annotations()
    changed = merge(UPSTREAMS, {"upstreams": UPSTREAMS["upstreams"][:1]})
    assert (
        render(changed).pod_annotations()["checksum/upstreams"]
        != rendered.pod_annotations()["checksum/upstreams"]
    )


def test_no_upstreams_file_without_upstreams() -> None:
    rendered = render()
    assert "WORKER_UPSTREAMS_FILE" not in rendered.config_map()["data"]
    assert len(rendered.of_kind("ConfigMap")) == 1
    assert "checksum/upstreams" not in rendered.pod_annotations()


@pytest.mark.parametrize("apis", [(), (KEDA_API, MONITORING_API)])
def test_secret_values_appear_nowhere_but_in_the_secret(apis: tuple[str, ...]) -> None:
    rendered = render(merge(SECRETS, {"dashboard": {"enabled": True}}), apis=apis)
    secret = rendered.one("Secret")
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert decoded == {"WORKER_UPSTREAM_API_KEY": FAKE_API_KEY, "WORKER_AMQP_URL": FAKE_AMQP_URL}

    for value in (FAKE_API_KEY, FAKE_AMQP_URL, "pw-DO-NOT-LEAK"):
        assert value not in rendered.text  # NOTES.txt included
    encoded = {value for value in secret["data"].values()}
    for doc in rendered.docs:
        if doc["kind"] == "Secret":
            continue
        dumped = json.dumps(doc)
        assert not any(value in dumped for value in encoded), doc["kind"]
    for config_map in rendered.of_kind("ConfigMap"):
        assert not SECRET_SETTINGS & set(config_map["data"])

    env = env_of(rendered.container())
    for name in SECRET_SETTINGS:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": FULLNAME, "key": name}
        assert "value" not in env[name]


def test_no_secret_is_rendered_without_secret_values() -> None:
    rendered = render()
    assert "Secret" not in rendered.kinds()
    assert not SECRET_SETTINGS & set(env_of(rendered.container()))


def test_existing_secret_is_referenced_not_created() -> None:
    values = {
        "secrets": {
            "existingSecret": "llm-credentials",
            "keys": {"amqpUrl": "amqp-url", "upstreamApiKey": "api-key"},
            # Ignored when an existing Secret is named.
            "upstreamApiKey": FAKE_API_KEY,
        }
    }
    rendered = render(values, apis=(KEDA_API,))
    assert "Secret" not in rendered.kinds()
    assert FAKE_API_KEY not in rendered.text
    env = env_of(rendered.container())
    assert env["WORKER_AMQP_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "llm-credentials",
        "key": "amqp-url",
    }
    assert env["WORKER_UPSTREAM_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "llm-credentials",
        "key": "api-key",
        "optional": True,
    }
    (target,) = rendered.one("TriggerAuthentication")["spec"]["secretTargetRef"]
    assert target == {"parameter": "host", "name": "llm-credentials", "key": "amqp-url"}
    annotations = rendered.pod_annotations()
    assert "checksum/config" in annotations
    assert "checksum/secret" not in annotations


def test_checksums_roll_the_pods_when_config_or_secret_change() -> None:
    base = render(SECRETS).pod_annotations()
    assert set(base) >= {"checksum/config", "checksum/secret"}
    assert all(len(base[key]) == 64 for key in ("checksum/config", "checksum/secret"))

    new_config = render(merge(SECRETS, {"config": {"concurrency": 8}})).pod_annotations()
    assert new_config["checksum/config"] != base["checksum/config"]
    assert new_config["checksum/secret"] == base["checksum/secret"]

    new_secret = render(merge(SECRETS, {"secrets": {"upstreamApiKey": "sk-rotated"}}))
    annotations = new_secret.pod_annotations()
    assert annotations["checksum/secret"] != base["checksum/secret"]
    assert annotations["checksum/config"] == base["checksum/config"]

    unrelated = render(merge(SECRETS, {"resources": {"limits": {"memory": "1Gi"}}}))
    assert unrelated.pod_annotations() == base


# --- scaling --------------------------------------------------------------------------------


def test_keda_scales_on_the_request_queue_when_its_api_exists() -> None:
    values = merge(SECRETS, {"config": {"requestQueue": "jobs.in", "concurrency": 16}})
    rendered = render(values, apis=(KEDA_API,))
    assert "HorizontalPodAutoscaler" not in rendered.kinds()
    assert "replicas" not in rendered.one("Deployment")["spec"]

    scaled = rendered.one("ScaledObject")
    auth = rendered.one("TriggerAuthentication")
    assert scaled["apiVersion"] == auth["apiVersion"] == KEDA_API
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 10)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == "jobs.in"
    assert trigger["metadata"]["mode"] == "QueueLength"
    # KEDA wants strings in trigger metadata; the default target is one prefetch per pod.
    assert trigger["metadata"]["value"] == "16"
    assert all(isinstance(value, str) for value in trigger["metadata"].values())
    assert "host" not in trigger["metadata"]
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": FULLNAME, "key": "WORKER_AMQP_URL"}
    ]


def test_keda_scales_on_the_sum_of_the_lanes_backlogs() -> None:
    values = merge(
        SECRETS,
        {
            "config": {"requestQueue": "chat.interactive:4, chat.batch:1,chat.bulk"},
            "autoscaling": {"behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}},
        },
    )
    spec = render(values, apis=(KEDA_API,)).one("ScaledObject")["spec"]
    triggers = spec["triggers"]
    assert [t["metadata"]["queueName"] for t in triggers] == [
        "chat.interactive",
        "chat.batch",
        "chat.bulk",
    ]
    assert [t["name"] for t in triggers] == ["lane0", "lane1", "lane2"]
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers["formula"] == "lane0 + lane1 + lane2"
    assert modifiers["target"] == "64"  # one prefetch per pod, for all lanes together
    assert modifiers["metricType"] == "AverageValue"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {"scaleDown": {"stabilizationWindowSeconds": 60}}


def test_keda_queue_length_and_scale_to_zero_are_configurable() -> None:
    values = merge(
        SECRETS,
        {"autoscaling": {"minReplicas": 0, "keda": {"queueLength": 200, "protocol": "amqp"}}},
    )
    spec = render(values, apis=(KEDA_API,)).one("ScaledObject")["spec"]
    assert spec["minReplicaCount"] == 0
    (trigger,) = spec["triggers"]
    assert trigger["metadata"]["value"] == "200"
    assert trigger["metadata"]["protocol"] == "amqp"


def test_keda_without_a_broker_url_fails_loudly() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"secrets\.amqpUrl or secrets\.existingSecret"):
        render({}, apis=(KEDA_API,))


@pytest.mark.parametrize(
    ("values", "apis"),
    [
        pytest.param(SECRETS, (), id="keda-api-absent"),
        pytest.param(
            merge(SECRETS, {"autoscaling": {"keda": {"enabled": False}}}),
            (KEDA_API,),
            id="keda-off",
        ),
    ],
)
def test_cpu_hpa_is_the_fallback(values: dict[str, Any], apis: tuple[str, ...]) -> None:
    rendered = render(merge(values, {"autoscaling": {"minReplicas": 0}}), apis=apis)
    assert not {"ScaledObject", "TriggerAuthentication"} & rendered.kinds()
    assert "replicas" not in rendered.one("Deployment")["spec"]
    hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == FULLNAME
    assert hpa["minReplicas"] == 1  # an HPA cannot go to zero
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_autoscaling_off_sets_replicas_and_no_autoscaler() -> None:
    values = merge(SECRETS, {"autoscaling": {"enabled": False}, "replicaCount": 3})
    rendered = render(values, apis=(KEDA_API,))
    assert rendered.one("Deployment")["spec"]["replicas"] == 3
    assert not {"ScaledObject", "TriggerAuthentication", "HorizontalPodAutoscaler"} & (
        rendered.kinds()
    )


def test_pdb_lets_one_pod_go_and_drains_past_unready_pods() -> None:
    spec = render().one("PodDisruptionBudget")["spec"]
    assert spec["maxUnavailable"] == 1
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    spec = render({"podDisruptionBudget": {"minAvailable": "50%"}}).one("PodDisruptionBudget")
    assert spec["spec"]["minAvailable"] == "50%"
    assert "maxUnavailable" not in spec["spec"]


# --- monitoring -----------------------------------------------------------------------------


def test_service_monitor_scrapes_metrics_when_its_api_exists() -> None:
    values = {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}
    rendered = render(values, apis=(MONITORING_API,))
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == MONITORING_API
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    service = rendered.one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_service_monitor_is_skipped_with_a_warning_without_its_api() -> None:
    rendered = render({"serviceMonitor": {"enabled": True}})
    assert "ServiceMonitor" not in rendered.kinds()
    assert "no ServiceMonitor was created" in rendered.text


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar() -> None:
    rendered = render({"dashboard": {"enabled": True}})
    (config_map,) = [d for d in rendered.of_kind("ConfigMap") if d["metadata"]["name"] != FULLNAME]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["chat-worker.json"]) == json.loads(DASHBOARD.read_text())
    assert [d["metadata"]["name"] for d in render().of_kind("ConfigMap")] == [FULLNAME]


# --- values schema --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"config": {"concurrency": 0}}, id="concurrency-0"),
        pytest.param({"config": {"concurrency": 2.5}}, id="concurrency-float"),
        pytest.param({"config": {"concurrency": "64"}}, id="concurrency-string"),
        pytest.param({"config": {"concurrency": 70000}}, id="concurrency-above-worker-max"),
        pytest.param({"config": {"queueType": "foo"}}, id="queue-type"),
        pytest.param({"config": {"logFormat": "xml"}}, id="log-format"),
        pytest.param({"config": {"logLevel": "loud"}}, id="log-level"),
        pytest.param({"config": {"httpPort": 0}}, id="http-port-off"),
        pytest.param({"config": {"shutdownGrace": -1}}, id="negative-grace"),
        pytest.param({"config": {"upstreamBaseUrl": "ftp://host/v1"}}, id="base-url-scheme"),
        pytest.param({"config": {"concurency": 8}}, id="misspelt-key"),
        pytest.param({"secrets": {"amqpUrl": "http://rabbit:15672"}}, id="amqp-url-scheme"),
        pytest.param({"autoscaling": {"maxReplicas": 0}}, id="max-replicas-0"),
        pytest.param({"image": {"pullPolicy": "Sometimes"}}, id="pull-policy"),
        pytest.param({"replicas": 3}, id="unknown-top-level-key"),
        pytest.param(
            {"upstreams": [{"name": "a", "base_url": "https://x/v1", "api_key": "sk-1"}]},
            id="upstream-key-inline",
        ),
        pytest.param(
            {"upstreams": [{"name": "a", "base_url": "https://x/v1", "headers": {"api-key": "k"}}]},
            id="upstream-key-in-headers",
        ),
        pytest.param(
            {"upstreams": [{"name": "A B", "base_url": "https://x/v1"}]}, id="upstream-name"
        ),
        pytest.param(
            {"upstreams": [{"name": "a", "base_url": "https://x/v1", "auth": "basic"}]},
            id="upstream-auth",
        ),
        pytest.param(
            {"upstreams": [{"name": "a", "base_url": "https://x/v1", "endpoints": ["images"]}]},
            id="upstream-endpoint",
        ),
        pytest.param(
            {"upstreams": [{"name": "a", "base_url": "https://x/v1", "endpoints": []}]},
            id="upstream-no-endpoint",
        ),
        pytest.param({"upstreamKeys": [{"name": "K", "secretName": "s"}]}, id="key-ref-no-key"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(values)
    assert lint(values)["errors"]


def test_values_schema_accepts_the_defaults_as_written() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(yaml.safe_load((CHART / "values.yaml").read_text()))
        schema = chart.schema
    assert schema is not None
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


def test_min_replicas_above_max_fails() -> None:
    with pytest.raises(helm.HelmRenderError, match="minReplicas"):
        render({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}})


# --- documentation --------------------------------------------------------------------------


def leaf_paths(values: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from leaf_paths(value, f"{path}.")
        else:
            yield path


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    undocumented = [
        path
        for path in leaf_paths(values)
        if not any(
            f"| `{'.'.join(path.split('.')[:n])}` |" in readme
            for n in range(1, path.count(".") + 2)
        )
    ]
    assert undocumented == []


# --- Grafana dashboard ----------------------------------------------------------------------


def dashboard_targets(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [t for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_uses_a_datasource_variable_everywhere() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == ref, panel["title"]
    for target in dashboard_targets(dashboard):
        assert target["datasource"] == ref
    for name in ("namespace", "job", "model"):
        assert variables[name]["datasource"] == ref
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "chat-worker"


def test_dashboard_covers_the_issue_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for t in dashboard_targets(dashboard)]

    def has(*needles: str) -> bool:
        return any(all(n in expr for n in needles) for expr in exprs)

    assert has("chat_worker_jobs_total", "by (outcome)")
    assert has("chat_worker_jobs_total", "by (error_code)", 'outcome="error"')
    for metric in (
        "gen_ai_client_operation_duration_seconds_bucket",
        "gen_ai_client_operation_time_to_first_chunk_seconds_bucket",
    ):
        for quantile in ("0.5", "0.95", "0.99"):
            assert has(f"histogram_quantile({quantile}", metric, "gen_ai_request_model")
    assert has("gen_ai_client_token_usage_sum", "gen_ai_request_model", "gen_ai_token_type")
    assert has("chat_worker_jobs_in_flight")
    assert has("chat_worker_retries_total")
    assert has("chat_worker_dead_lettered_total")
    # Lanes and tenants (§12): a per-lane panel, tokens by tenant.
    assert has("chat_worker_jobs_total", "by (lane)")
    assert has("chat_worker_job_duration_seconds_bucket", "le, lane")
    assert has("chat_worker_tokens_total", "by (tenant)")


def test_dashboard_queries_only_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for t in dashboard_targets(dashboard)]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {m for q in queries for m in re.findall(r"\b(?:chat_worker|gen_ai_client)_\w+", q)}
    assert used == DASHBOARD_METRICS


def test_dashboard_panels_tile_the_grid_without_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


# --- the console (contract §14) -------------------------------------------------------------

CONSOLE = f"{FULLNAME}-console"
FAKE_CONSOLE_TOKEN = "console-DO-NOT-LEAK-3e9a"


def named(rendered: Rendered, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in rendered.of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def test_console_is_off_by_default() -> None:
    rendered = render(SECRETS)
    names = {doc["metadata"]["name"] for doc in rendered.docs}
    assert CONSOLE not in names
    assert rendered.config_map()["data"]["WORKER_EVENTS"] == "true"
    assert rendered.config_map()["data"]["WORKER_EVENTS_EXCHANGE"] == "chat.events"


def test_console_runs_apart_from_the_workers_with_its_token_from_a_secret() -> None:
    rendered = render(merge(SECRETS, {"console": {"enabled": True, "token": FAKE_CONSOLE_TOKEN}}))
    deployment = named(rendered, "Deployment", CONSOLE)
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["console", "--host", "0.0.0.0", "--port", "8090"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"configMapRef": {"name": FULLNAME}} in container["envFrom"]
    env = env_of(container)
    assert env["WORKER_CONSOLE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": CONSOLE,
        "key": "WORKER_CONSOLE_TOKEN",
    }
    assert env["WORKER_AMQP_URL"]["valueFrom"]["secretKeyRef"]["name"] == FULLNAME
    secret = named(rendered, "Secret", CONSOLE)
    assert base64.b64decode(secret["data"]["WORKER_CONSOLE_TOKEN"]).decode() == FAKE_CONSOLE_TOKEN
    assert FAKE_CONSOLE_TOKEN not in rendered.text

    service = named(rendered, "Service", CONSOLE)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8090
    # No worker selector picks the console's pods (nor the other way round).
    console_labels = pod["metadata"]["labels"]
    for doc in (named(rendered, "Deployment", FULLNAME), named(rendered, "Service", FULLNAME)):
        selector = doc["spec"].get("selector", {})
        selector = selector.get("matchLabels", selector)
        assert not all(console_labels.get(k) == v for k, v in selector.items()), doc["kind"]


def test_console_without_a_token_is_read_only_and_reads_an_existing_secret() -> None:
    rendered = render({"console": {"enabled": True}})
    (container,) = named(rendered, "Deployment", CONSOLE)["spec"]["template"]["spec"]["containers"]
    assert "WORKER_CONSOLE_TOKEN" not in env_of(container)
    assert "Secret" not in rendered.kinds()

    rendered = render({"console": {"enabled": True, "existingSecret": "ops", "secretKey": "t"}})
    (container,) = named(rendered, "Deployment", CONSOLE)["spec"]["template"]["spec"]["containers"]
    ref = env_of(container)["WORKER_CONSOLE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "ops", "key": "t"}
    assert "Secret" not in rendered.kinds()


# --- the gateway (contract §15) -------------------------------------------------------------

GATEWAY = f"{FULLNAME}-gateway"
SQLITE_MESSAGE = "several replicas need PostgreSQL"


def only_container(rendered: Rendered, name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = named(rendered, "Deployment", name)["spec"]["template"][
        "spec"
    ]["containers"]
    (container,) = containers
    return container


def gateway_container(rendered: Rendered) -> dict[str, Any]:
    return only_container(rendered, GATEWAY)


def test_gateway_is_off_by_default() -> None:
    for rendered in (render(SECRETS), render(SECRETS, apis=(KEDA_API, MONITORING_API))):
        names = {doc["metadata"]["name"] for doc in rendered.docs}
        assert not any(name.startswith(GATEWAY) for name in names)
        assert "gateway" not in json.dumps(rendered.docs)
        assert rendered.config_map()["data"]["WORKER_TRUST_TENANT_HEADER"] == "false"
        assert "WORKER_DATABASE_URL" not in rendered.text


def test_gateway_renders_a_deployment_service_and_hpa_that_validate() -> None:
    rendered = render(merge(SECRETS, GATEWAY_POSTGRES), apis=(KEDA_API,))
    deployment = named(rendered, "Deployment", GATEWAY)
    service = named(rendered, "Service", GATEWAY)
    hpa = named(rendered, "HorizontalPodAutoscaler", GATEWAY)
    for doc in (deployment, service, hpa, named(rendered, "Secret", GATEWAY)):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"

    # The autoscaler owns the count; the workers keep KEDA.
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": GATEWAY,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["averageUtilization"] == 70
    assert rendered.one("ScaledObject")["spec"]["scaleTargetRef"]["name"] == FULLNAME

    container = gateway_container(rendered)
    assert container["args"] == ["gateway"]
    assert container["image"] == only_container(rendered, FULLNAME)["image"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"]["requests"]["cpu"]  # the HPA needs a CPU request
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # Same broker settings as the workers: their ConfigMap and their Secret.
    assert {"configMapRef": {"name": FULLNAME}} in container["envFrom"]
    env = env_of(container)
    assert env["WORKER_AMQP_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": FULLNAME,
        "key": "WORKER_AMQP_URL",
    }
    assert "WORKER_UPSTREAM_API_KEY" not in env  # the gateway never calls the upstream
    assert env["WORKER_GATEWAY_HOST"]["value"] == "0.0.0.0"
    assert env["WORKER_GATEWAY_PORT"]["value"] == "8000"
    assert env["WORKER_GATEWAY_MAX_FILE_BYTES"]["value"] == "104857600"
    assert env["WORKER_GATEWAY_LANE"]["value"] == "chat.interactive"
    assert env["WORKER_GATEWAY_BATCH_LANE"]["value"] == "chat.batch"
    assert "WORKER_GATEWAY_MAX_FILE_LINES" not in env

    # The Service: port 8000, named http, onto the gateway's pods only.
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for doc in rendered.docs:
        if doc["metadata"]["name"] == GATEWAY or doc["kind"] not in {"Deployment", "Service"}:
            continue
        selector = doc["spec"].get("selector", {})
        selector = selector.get("matchLabels", selector)
        assert not all(gateway_labels.get(k) == v for k, v in selector.items()), doc["kind"]
    pdb_selector = rendered.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert not all(gateway_labels.get(k) == v for k, v in pdb_selector.items())


def test_gateway_database_url_is_in_a_secret_never_inlined() -> None:
    rendered = render(merge(SECRETS, GATEWAY_POSTGRES), apis=(KEDA_API,))
    secret = named(rendered, "Secret", GATEWAY)
    assert base64.b64decode(secret["data"]["WORKER_DATABASE_URL"]).decode() == FAKE_DATABASE_URL
    for value in (FAKE_DATABASE_URL, "db-DO-NOT-LEAK"):
        assert value not in rendered.text  # NOTES.txt included
    encoded = secret["data"]["WORKER_DATABASE_URL"]
    for doc in rendered.docs:
        if doc["kind"] != "Secret":
            assert encoded not in json.dumps(doc), doc["kind"]
    ref = env_of(gateway_container(rendered))["WORKER_DATABASE_URL"]
    assert ref == {
        "name": "WORKER_DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": GATEWAY, "key": "WORKER_DATABASE_URL"}},
    }
    # A new URL rolls the gateway's pods.
    annotations = named(rendered, "Deployment", GATEWAY)["spec"]["template"]["metadata"][
        "annotations"
    ]
    rotated = render(
        merge(SECRETS, GATEWAY_POSTGRES, {"gateway": {"database": {"url": "postgresql://x/y"}}})
    )
    rotated_annotations = named(rotated, "Deployment", GATEWAY)["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert rotated_annotations["checksum/database"] != annotations["checksum/database"]


def test_gateway_existing_secrets_are_referenced_not_created() -> None:
    values = {
        "secrets": {"existingSecret": "llm-credentials"},
        "gateway": {
            "enabled": True,
            "replicaCount": 3,  # the chart cannot see the URL: no SQLite refusal
            "database": {
                "existingSecret": "gateway-db",
                "secretKey": "url",
                "url": FAKE_DATABASE_URL,  # ignored when an existing Secret is named
            },
            "keys": {"existingSecret": "gateway-keys", "secretKey": "tenants.yaml"},
        },
    }
    rendered = render(values)
    assert "Secret" not in rendered.kinds()
    assert FAKE_DATABASE_URL not in rendered.text
    deployment = named(rendered, "Deployment", GATEWAY)
    assert deployment["spec"]["replicas"] == 3
    assert "HorizontalPodAutoscaler" not in {
        d["kind"] for d in rendered.docs if d["metadata"]["name"] == GATEWAY
    }
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert env["WORKER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "gateway-db",
        "key": "url",
    }
    assert env["WORKER_AMQP_URL"]["valueFrom"]["secretKeyRef"]["name"] == "llm-credentials"
    # The keys file: the Secret mounted as files, the variable pointing at one of them.
    (keys_volume,) = [v for v in pod["volumes"] if v["name"] == "keys"]
    assert keys_volume["secret"]["secretName"] == "gateway-keys"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "keys"]
    assert mount["readOnly"] is True
    assert env["WORKER_GATEWAY_KEYS_FILE"]["value"] == f"{mount['mountPath']}/tenants.yaml"
    assert "checksum/database" not in deployment["spec"]["template"]["metadata"]["annotations"]
    assert "WARNING: gateway.keys" not in rendered.text


def test_gateway_without_keys_is_open_and_says_so() -> None:
    rendered = render(merge(SECRETS, {"gateway": {"enabled": True}}))
    container = gateway_container(rendered)
    assert "WORKER_GATEWAY_KEYS_FILE" not in env_of(container)
    assert not [m for m in container["volumeMounts"] if m["name"] == "keys"]
    assert "WARNING: gateway.keys.existingSecret is empty" in rendered.text
    # The default: one replica on a SQLite file in a writable volume (the root is read-only).
    deployment = named(rendered, "Deployment", GATEWAY)
    assert deployment["spec"]["replicas"] == 1
    secret = named(rendered, "Secret", GATEWAY)
    url = base64.b64decode(secret["data"]["WORKER_DATABASE_URL"]).decode()
    assert url.startswith("sqlite:////var/lib/chat-worker/")
    (data,) = [m for m in container["volumeMounts"] if m["name"] == "data"]
    assert url.removeprefix("sqlite:///").startswith(data["mountPath"] + "/")


@pytest.mark.parametrize("values", [{}, {"gateway": {"enabled": False}}], ids=["unset", "off"])
def test_workers_trust_the_tenant_header_only_with_the_gateway(values: dict[str, Any]) -> None:
    assert render(values).config_map()["data"]["WORKER_TRUST_TENANT_HEADER"] == "false"
    on = render(merge(values, {"gateway": {"enabled": True}}))
    assert on.config_map()["data"]["WORKER_TRUST_TENANT_HEADER"] == "true"
    # The workers read it through the ConfigMap, and the change rolls them.
    assert {"configMapRef": {"name": FULLNAME}} in only_container(on, FULLNAME)["envFrom"]
    before = render(values).pod_annotations()["checksum/config"]
    after = named(on, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["annotations"]
    assert after["checksum/config"] != before
    # Set by hand without the gateway, it stays.
    manual = render({"config": {"trustTenantHeader": True}})
    assert manual.config_map()["data"]["WORKER_TRUST_TENANT_HEADER"] == "true"


@pytest.mark.parametrize(
    "gateway",
    [
        pytest.param({"replicaCount": 2}, id="replicas"),
        pytest.param({"autoscaling": {"enabled": True}}, id="autoscaling"),
        pytest.param(
            {"replicaCount": 3, "database": {"url": "sqlite:////data/gw.db"}}, id="explicit-url"
        ),
    ],
)
def test_gateway_on_sqlite_with_several_replicas_fails(gateway: dict[str, Any]) -> None:
    values = merge(SECRETS, {"gateway": {"enabled": True, **gateway}})
    # (`helm lint` runs templates in lint mode, where `fail` only logs: render is the check.)
    with pytest.raises(helm.HelmRenderError, match=SQLITE_MESSAGE):
        render(values)


@pytest.mark.parametrize(
    "gateway",
    [
        pytest.param({"replicaCount": 1}, id="one-replica"),
        pytest.param(
            {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 1}},
            id="autoscaling-to-one",
        ),
        pytest.param({"replicaCount": 4, "database": {"url": FAKE_DATABASE_URL}}, id="postgres"),
        pytest.param(
            {"replicaCount": 4, "database": {"existingSecret": "gateway-db"}}, id="existing"
        ),
    ],
)
def test_gateway_replicas_that_are_allowed(gateway: dict[str, Any]) -> None:
    rendered = render(merge(SECRETS, {"gateway": {"enabled": True, **gateway}}))
    named(rendered, "Deployment", GATEWAY)


def test_gateway_min_replicas_above_max_fails() -> None:
    gateway = {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}
    values = merge(GATEWAY_POSTGRES, {"gateway": gateway})
    with pytest.raises(helm.HelmRenderError, match="minReplicas"):
        render(values)


@pytest.mark.parametrize(
    "gateway",
    [
        pytest.param({"enable": True}, id="misspelt-key"),
        pytest.param({"database": {"url": "mysql://x/y"}}, id="database-scheme"),
        pytest.param({"database": {"password": "pw"}}, id="database-unknown-key"),
        pytest.param({"keys": {"inline": "keys: []"}}, id="keys-inline"),
        pytest.param({"keys": {"existingSecret": "Not_A_Name"}}, id="keys-secret-name"),
        pytest.param({"port": 0}, id="port-0"),
        pytest.param({"replicaCount": -1}, id="negative-replicas"),
        pytest.param({"autoscaling": {"minReplicas": 0}}, id="min-replicas-0"),
        pytest.param({"autoscaling": {"targetCPU": 50}}, id="autoscaling-unknown-key"),
        pytest.param({"maxFileBytes": "200MB"}, id="max-file-bytes-string"),
        pytest.param({"lane": "a:1,b:2"}, id="lane-is-a-list"),
        pytest.param({"service": {"type": "ExternalName"}}, id="service-type"),
    ],
)
def test_gateway_schema_rejects_bad_values(gateway: dict[str, Any]) -> None:
    values = {"gateway": {"enabled": True, **gateway}}
    with pytest.raises(helm.HelmValuesError):
        render(values)
