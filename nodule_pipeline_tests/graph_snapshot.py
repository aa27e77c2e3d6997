"""What users rely on in the Definitions, as plain JSON: asset keys and their deps, partitions,
checks, automation conditions, pools and code versions; jobs, schedules and sensors with the run
tags that place and limit their runs. ``test_definitions`` compares it with the committed
``snapshots/definitions.json``; ``make snapshot`` rewrites that file after a deliberate change.
"""

from __future__ import annotations

import json
from pathlib import Path

from dagster import AutomationCondition, Definitions, PartitionsDefinition
from dagster._core.definitions.automation_condition_sensor_definition import AutomationConditionSensorDefinition

SNAPSHOT = Path(__file__).resolve().parent / "snapshots" / "definitions.json"
UPDATE_ENV = "NODULE_PIPELINE_UPDATE_SNAPSHOT"


def _partitions(partitions_def: PartitionsDefinition | None) -> str | None:
    return None if partitions_def is None else f"{type(partitions_def).__name__}:{getattr(partitions_def, 'name', '')}"


def _condition(condition: AutomationCondition | None) -> object:
    """The condition as a tree: each node's operator (with the selections it allows or ignores)
    and, where it has one, the label the UI shows."""
    if condition is None:
        return None
    children = [_condition(child) for child in condition.children]
    label = condition.get_label()
    node = f"{label} = {condition.name}" if label else condition.name
    return {node: children} if children else node


def _tags(tags: dict[str, str]) -> dict[str, object]:
    """Run tags, JSON values (dagster-k8s/config) parsed so that a change reads as a diff."""
    parsed: dict[str, object] = {}
    for key, value in sorted(tags.items()):
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def definitions_snapshot(defs: Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        checks = {}
        for check_key in sorted(node.check_keys, key=lambda k: k.name):
            spec = graph.get_check_spec(check_key)
            checks[check_key.name] = {
                "blocking": spec.blocking,
                "partitions": _partitions(spec.partitions_def),
                "deps": sorted(dep.asset_key.to_user_string() for dep in spec.additional_deps),
            }
        assets[key.to_user_string()] = {
            "deps": sorted(parent.to_user_string() for parent in node.parent_keys),
            "partitions": _partitions(node.partitions_def),
            "group": node.group_name,
            "code_version": node.code_version,
            "pools": sorted(node.pools or []),
            "automation_condition": _condition(node.automation_condition),
            "checks": checks,
        }
    jobs = {
        job.name: {
            "assets": sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys),
            "partitions": _partitions(job.partitions_def),
            "tags": _tags(dict(job.tags)),
        }
        for job in sorted(defs.resolve_all_job_defs(), key=lambda j: j.name)
        if not job.name.startswith("__")
    }
    schedules = {
        schedule.name: {
            "cron": schedule.cron_schedule,
            "job": schedule.job_name,
            "default_status": schedule.default_status.value,
            "tags": _tags(dict(schedule.tags)),
        }
        for schedule in sorted(defs.schedules or [], key=lambda s: s.name)
    }
    sensors = {}
    for sensor in sorted(defs.sensors or [], key=lambda s: s.name):
        entry = {
            "type": sensor.sensor_type.value,
            "default_status": sensor.default_status.value,
            "minimum_interval_seconds": sensor.minimum_interval_seconds,
        }
        if isinstance(sensor, AutomationConditionSensorDefinition):
            entry["assets"] = sorted(k.to_user_string() for k in sensor.asset_selection.resolve(graph))
            entry["run_tags"] = _tags(dict(sensor.run_tags))
        else:
            entry["jobs"] = sorted(target.job_name for target in sensor.targets)
        sensors[sensor.name] = entry
    return {"assets": assets, "jobs": jobs, "schedules": schedules, "sensors": sensors}


def render(snapshot: dict) -> str:
    return json.dumps(snapshot, indent=2, sort_keys=True) + "\n"
