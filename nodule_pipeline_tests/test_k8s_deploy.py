"""deploy/ against dagster-k8s's own schema, and the GPU placement of the runs that train.

The Helm chart renders the K8sRunLauncher section and the instance's concurrency settings from
deploy/k8s/values.yaml; here they go through the config schemas of dagster-k8s (the ``[k8s]``
extra, installed by ``make venv``) and of the Dagster instance, and a run's ``dagster-k8s/config``
tag goes through the code that builds the run worker's Kubernetes Job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from dagster import AutomationConditionSensorDefinition
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config_schema
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from nodule_pipeline import concurrency

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
VALUES = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())
INSTANCE = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
(USER_CODE,) = VALUES["dagster-user-deployments"]["deployments"]
CODE_ENV = {item["name"]: item["value"] for item in USER_CODE["env"]}
CHART_FIELDS = {
    "instance_config_map": "dagster-instance",
    "service_account_name": "dagster",
    "job_namespace": "dagster",
}
"""What the chart fills in itself when it renders the run launcher (names of its own objects)."""


def snake_case(value: object) -> object:
    """Helm's camelCase keys as the chart renders them into dagster.yaml."""
    if isinstance(value, dict):
        return {re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(): snake_case(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snake_case(item) for item in value]
    return value


def test_run_launcher_values_fit_the_k8s_run_launcher_schema() -> None:
    launcher = VALUES["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    config = {**CHART_FIELDS, **snake_case(launcher["config"]["k8sRunLauncher"])}
    result = validate_config(K8sRunLauncher.config_type(), config)
    assert result.success, [error.message for error in result.errors]


def test_helm_concurrency_is_the_instance_concurrency() -> None:
    """Pools, run-queue limits and run monitoring (which frees the slots of runs that died) are
    the same in deploy/dagster.yaml and the Helm values, and read as valid instance config."""
    instance = INSTANCE["concurrency"]
    assert instance["pools"] == {"default_limit": 1, "granularity": "op"}
    helm = VALUES["concurrency"]
    assert helm["enabled"] and snake_case(helm["pools"]) == instance["pools"]
    queue = VALUES["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queue["maxConcurrentRuns"] == instance["runs"]["max_concurrent_runs"]
    assert queue["tagConcurrencyLimits"] == instance["runs"]["tag_concurrency_limits"]
    monitoring = VALUES["dagsterDaemon"]["runMonitoring"]
    assert monitoring["enabled"] and snake_case(monitoring) == INSTANCE["run_monitoring"]
    result = validate_config(dagster_instance_config_schema(), INSTANCE)
    assert result.success, [error.message for error in result.errors]


def test_runs_that_train_carry_the_gpu_tag() -> None:
    """Training jobs, the retrain schedule, the automation sensor that re-runs the evaluation and the
    comparison study with its schedule (backfills of those jobs included: they carry the job's
    tags) ask for a GPU; nothing else does."""
    from nodule_pipeline.definitions import defs

    gpu = concurrency.TRAIN[concurrency.K8S_CONFIG_TAG]
    tags = {job.name: job.tags for job in defs.resolve_all_job_defs() if not job.name.startswith("__")}
    tags |= {s.name: s.tags for s in defs.schedules}
    tags |= {s.name: s.run_tags for s in defs.sensors if isinstance(s, AutomationConditionSensorDefinition)}
    asking = {name for name, run_tags in tags.items() if run_tags.get(concurrency.K8S_CONFIG_TAG) == gpu}
    assert asking == {
        "build_library",
        "retrain",
        "weekly_retrain",
        "evaluation_after_retrain",
        "study",
        "monthly_study",
    }
    assert not [
        name for name, run_tags in tags.items() if name not in asking and concurrency.K8S_CONFIG_TAG in run_tags
    ]


def test_the_gpu_tag_makes_a_run_worker_job_on_the_gpu_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The code server's environment from the Helm values, through dagster-k8s's tag schema and
    the function that builds the run worker's Kubernetes Job."""
    for name in (concurrency.GPU_NODE_SELECTOR_ENV, concurrency.GPU_TOLERATIONS_ENV):
        monkeypatch.setenv(name, CODE_ENV[name])
    tags = {concurrency.K8S_CONFIG_TAG: json.dumps(concurrency.gpu_pod_config())}
    user_config = get_user_defined_k8s_config(tags)  # raises on anything dagster-k8s's schema rejects
    job_config = DagsterK8sJobConfig(
        job_image="registry.example.com/nodule-pipeline:0.1.0",
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
        image_pull_policy=VALUES["runLauncher"]["config"]["k8sRunLauncher"]["imagePullPolicy"],
    )
    job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_run"], "dagster-run-1", user_config)
    pod = job.spec.template.spec
    assert pod.containers[0].resources.limits == {"nvidia.com/gpu": "1"}
    assert pod.node_selector == json.loads(CODE_ENV[concurrency.GPU_NODE_SELECTOR_ENV]) != {}
    expected = json.loads(CODE_ENV[concurrency.GPU_TOLERATIONS_ENV])
    assert [{k: v for k, v in t.to_dict().items() if v is not None} for t in pod.tolerations] == expected


def test_without_cluster_settings_the_gpu_taint_is_tolerated(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (concurrency.GPU_NODE_SELECTOR_ENV, concurrency.GPU_TOLERATIONS_ENV):
        monkeypatch.delenv(name, raising=False)
    config = concurrency.gpu_pod_config()
    assert config["pod_spec_config"] == {"tolerations": concurrency.DEFAULT_GPU_TOLERATIONS}
    get_user_defined_k8s_config({concurrency.K8S_CONFIG_TAG: json.dumps(config)})


SEARCH_SERVER = list(yaml.safe_load_all((DEPLOY / "k8s" / "search-server.yaml").read_text()))


def _as_kubernetes(document: dict) -> object:
    """A manifest read into the Kubernetes client's own model of its kind (its field names and
    types; an unknown or misspelt field does not survive the round trip)."""
    from kubernetes.client import ApiClient

    model = ApiClient()._ApiClient__deserialize(document, f"V1{document['kind']}")
    return ApiClient().sanitize_for_serialization(model)


def test_the_search_server_manifests_are_kubernetes_objects() -> None:
    kinds = [document["kind"] for document in SEARCH_SERVER]
    assert kinds == ["Deployment", "Service"]
    for document in SEARCH_SERVER:
        assert _as_kubernetes(document) == document, f"{document['kind']}: a field Kubernetes does not know"


def test_the_search_server_is_not_exposed_without_its_token() -> None:
    """It binds the pod's addresses (which the server refuses without a token), the token is a
    file from a Secret, the Service stays inside the cluster, and the probes send an allowed Host."""
    from nodule_pipeline.cli import build_parser
    from nodule_pipeline.serve.security import TOKEN_ENV, Access

    deployment, service = SEARCH_SERVER
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    arguments = build_parser().parse_args(container["args"][1:])
    assert container["args"][0] == "nodule-pipeline" and arguments.command == "serve"
    assert arguments.host == "0.0.0.0" and arguments.token_file
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    token_volume = next(name for name, mount in mounts.items() if arguments.token_file.startswith(mount["mountPath"]))
    assert mounts[token_volume]["readOnly"] is True
    assert volumes[token_volume]["secret"]["secretName"] == "nodule-search-token"
    assert all(TOKEN_ENV not in item["name"] for item in container.get("env", []))
    assert volumes["nodule-data"] == USER_CODE["volumes"][0]  # the pipeline's shared claim
    assert arguments.data_dir == CODE_ENV["NODULE_PIPELINE_DATA_DIR"]
    access = Access.for_server("x" * 32, arguments.host, arguments.allowed_host)
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        host = {header["name"]: header["value"] for header in get["httpHeaders"]}["Host"]
        assert access.host_allowed(host) and get["path"] == "/openapi.json"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert pod["securityContext"]["runAsNonRoot"] is True
