"""How many runs and steps go at once, and where a run is placed.

- Stage tags (``nodule_pipeline/stage``) on every job and automation run: the production run queue
  limits runs per stage (deploy/dagster.yaml), so a backfill of hundreds of patients waits its turn.
- Concurrency pools on the steps that must never overlap: ``gpu`` (training: ``hash_model`` and
  the pathology folds of ``retrieval_evaluation``), ``study`` (``comparison_study`` retrains every
  method: in its own pool and run stage, so a long study never holds a retrain back) and ``index``
  (``hash_index`` rewrites the one index). Their limits are the instance's ``concurrency: pools:
  default_limit: 1``; every run claims a slot per step, whatever launched it (the UI, a backfill,
  a schedule, a sensor, ``nodule-pipeline run``).
- On Kubernetes, runs that train carry a ``dagster-k8s/config`` tag: one ``nvidia.com/gpu``, and
  the node selector and tolerations of the GPU nodes, which come from the code server's
  environment (set in deploy/k8s/values.yaml). Other launchers ignore the tag.
"""

from __future__ import annotations

import json
import os

STAGE_TAG = "nodule_pipeline/stage"
GPU_POOL = "gpu"
STUDY_POOL = "study"
INDEX_POOL = "index"

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_NODE_SELECTOR_ENV = "NODULE_PIPELINE_GPU_NODE_SELECTOR"
GPU_TOLERATIONS_ENV = "NODULE_PIPELINE_GPU_TOLERATIONS"
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
"""The taint that GPU node pools of GKE, EKS and AKS (and the NVIDIA GPU operator) carry."""


def gpu_pod_config() -> dict:
    """``dagster-k8s/config`` for a run that trains: one GPU, on the nodes that have them.
    ``NODULE_PIPELINE_GPU_NODE_SELECTOR`` (a JSON object) and ``NODULE_PIPELINE_GPU_TOLERATIONS``
    (a JSON list) describe the cluster's GPU nodes; without them, no node selector and the
    ``nvidia.com/gpu`` taint tolerated."""
    node_selector = json.loads(os.environ.get(GPU_NODE_SELECTOR_ENV) or "{}")
    tolerations = json.loads(os.environ.get(GPU_TOLERATIONS_ENV) or json.dumps(DEFAULT_GPU_TOLERATIONS))
    pod_spec = {"tolerations": tolerations, **({"node_selector": node_selector} if node_selector else {})}
    return {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}},
        "pod_spec_config": pod_spec,
    }


INGEST = {STAGE_TAG: "ingest"}
INDEX = {STAGE_TAG: "index"}
TRAIN = {STAGE_TAG: "train", K8S_CONFIG_TAG: json.dumps(gpu_pod_config(), sort_keys=True)}
STUDY = {STAGE_TAG: "study", K8S_CONFIG_TAG: json.dumps(gpu_pod_config(), sort_keys=True)}
"""Run tags per stage; training runs and studies also ask Kubernetes for a GPU."""
