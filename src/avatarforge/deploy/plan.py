"""The plan: what deploy wants to exist, compared with what exists. Pure functions, plain data.

A :class:`Resource` carries the request parameters of the AWS call that makes it (``attrs``), so
the executor (:mod:`.apply`) calls ``create_model(**attrs)`` and the plan printed by
``--dry-run`` is exactly what would be sent. ``action`` is ``create``, ``update``,
``unchanged``, ``delete`` or ``conflict`` (exists but is not ours) against a :data:`State` (what
exists, read by :func:`.state.read_state`); a dry run plans against an empty state.

The planners of each command are :func:`.mme.plan_mme`, :func:`.training.plan_training` and
:func:`plan_destroy`; :func:`diff` is the comparison they share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .config import DeployConfig

VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
RESCALE_NOTE = "re-registered: SageMaker refuses an instance type change under autoscaling"


@dataclass
class Resource:
    """One AWS resource: kind, name, request parameters and what to do with it."""

    kind: str
    name: str
    attrs: dict[str, Any]
    action: str = "create"
    changes: list[str] = field(default_factory=list)  # why update / conflict / delete
    arn: str = ""  # of the existing resource, when known

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Existing:
    """What exists under a resource's name: its attributes in the same shape as ``attrs``."""

    attrs: dict[str, Any]
    tags: dict[str, str] | None = None  # None: the kind carries no tags we can read
    arn: str = ""


State = dict[tuple[str, str], Existing]


@dataclass
class Plan:
    """Everything one command would do, and the facts a reader needs to judge it."""

    command: str  # "mme", "training" or "destroy"
    deployment: str
    region: str
    account: str  # "" in a dry run (no AWS account consulted)
    resources: list[Resource]
    facts: dict[str, Any] = field(default_factory=dict)
    blockers: list[str] = field(default_factory=list)  # a real run stops on any of these
    notes: list[str] = field(default_factory=list)

    @property
    def changes(self) -> list[Resource]:
        return [r for r in self.resources if r.action != "unchanged"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- small helpers


def content_hash(attrs: dict[str, Any], length: int = 8) -> str:
    """Short sha256 of a JSON-serialisable dict, independent of key order."""
    raw = json.dumps(attrs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:length]


def ref(kind: str, name: str) -> str:
    """A reference to another resource's ARN, resolved when the ARN is known."""
    return f"${{{kind}:{name}}}"


def variant_resource_id(endpoint: str) -> str:
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def plan_destroy(
    config: DeployConfig, found: list[Resource], *, account: str = "", notes: list[str] = ()
) -> Plan:
    """Delete what was found carrying our tag (found by avatarforge.deploy.state.discover)."""
    for r in found:
        r.action = "delete"
    notes = [f"only resources tagged {config.tag['Key']}={config.tag['Value']} are listed", *notes]
    return Plan("destroy", config.name, config.region, account, found, {}, [], notes)


# ---------------------------------------------------------------- comparing with what exists


def _differences(want: Any, have: Any, path: str = "") -> list[str]:
    """Where ``have`` differs from ``want``; keys only ``have`` has (AWS defaults) are ignored."""
    if isinstance(want, dict) and isinstance(have, dict):
        out = []
        for key, value in want.items():
            out += _differences(value, have.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(want, list) and isinstance(have, list) and len(want) == len(have):
        return [
            d
            for i, (w, h) in enumerate(zip(want, have, strict=True))
            for d in _differences(w, h, f"{path}[{i}]")
        ]
    both_numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (want, have))
    if (both_numbers and float(want) == float(have)) or want == have:
        return []
    return [f"{path}: {_short(have)} -> {_short(want)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve(value: Any, arns: dict[tuple[str, str], str]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, arns) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, arns) for v in value]
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        kind, _, name = value[2:-1].partition(":")
        return arns.get((kind, name), value)
    return value


_TAGGED = {
    "kms_key",
    "iam_role",
    "sagemaker_model",
    "endpoint_config",
    "endpoint",
    "sns_topic",
    "cloudwatch_alarm",
}
_COMPARED = {
    "kms_key",
    "s3_bucket_encryption",
    "s3_lifecycle",
    "sns_topic",
    "log_group",
    "iam_role",
    "endpoint",
    "scalable_target",
    "scaling_policy",
    "cloudwatch_alarm",
    "s3_object",
}


def diff(
    desired: list[Resource], state: State, config: DeployConfig, component: str
) -> list[Resource]:
    """Set each resource's action against ``state``; append deletes of the models and endpoint
    configs this deployment made before and no longer uses (after the endpoint update)."""
    tag_key, tag_value = config.tag["Key"], config.tag["Value"]
    arns: dict[tuple[str, str], str] = {}
    out: list[Resource] = []
    rescale: set[str] = set()  # endpoints whose scaling must be re-registered (instance type)
    for r in desired:
        have = state.get((r.kind, r.name))
        if have is None:
            # no lifecycle rules wanted on a bucket that does not exist yet: nothing to make
            empty = r.kind == "s3_lifecycle" and not r.attrs["Rules"]
            r.action = "unchanged" if empty else "create"
            out.append(r)
            continue
        r.arn = have.arn
        if r.kind in _TAGGED and (have.tags or {}).get(tag_key) != tag_value:
            r.action = "conflict"
            r.changes = [f"exists but is not tagged {tag_key}={tag_value}: not ours, not touched"]
        elif r.kind == "kms_key" and have.attrs.get("_State") != "Enabled":
            r.action = "conflict"
            r.changes = [
                f"the key under {r.name} is {have.attrs.get('_State')}: enable it (or cancel its "
                "deletion), or delete the alias so that deploy makes a new key"
            ]
        elif r.kind == "s3_bucket_encryption" and (have.tags or {}).get(tag_key) != tag_value:
            # not our bucket: its default encryption is its owner's; equal is fine
            r.changes = _differences(_resolve(r.attrs, arns), have.attrs)
            r.action = "conflict" if r.changes else "unchanged"
            if r.changes:
                r.changes.append(
                    "the bucket's default encryption is its owner's, not deploy's: set it to "
                    "the deployment's key yourself, or use a bucket deploy creates"
                )
        elif r.kind == "endpoint" and have.attrs.get("_Status") == "Failed":
            r.action = "conflict"
            r.changes = [
                f"endpoint is Failed ({have.attrs.get('_FailureReason') or 'no reason given'}): "
                "a failed endpoint cannot be updated; `avatarforge deploy destroy`, then deploy"
            ]
        elif r.kind == "s3_bucket" and have.attrs.get("Region") != r.attrs["Region"]:
            r.action = "conflict"
            r.changes = [
                f"bucket is in {have.attrs.get('Region')}, the deployment in {r.attrs['Region']}"
            ]
        elif r.kind in _COMPARED:
            want = _resolve({k: v for k, v in r.attrs.items() if k not in ("source", "size")}, arns)
            r.changes = _differences(want, have.attrs)
            r.action = "update" if r.changes else "unchanged"
        else:
            r.action = "unchanged"  # bucket, topic, content-named model and endpoint config
        if r.kind == "endpoint" and r.action == "update":
            new_type = _variant_type(desired, r.attrs["EndpointConfigName"])
            old_type = have.attrs.get("_InstanceType")
            if old_type and new_type and old_type != new_type:
                rescale.add(r.name)
        if r.kind in ("scalable_target", "scaling_policy") and _endpoint_of(r) in rescale:
            if r.action == "unchanged":
                r.action = "update"
            r.changes.append(RESCALE_NOTE)
        if r.action == "unchanged" and have.arn:
            arns[(r.kind, r.name)] = have.arn
        out.append(r)
    return out + _superseded(desired, state, config, component)


def _variant_type(resources: list[Resource], config_name: str) -> str | None:
    for r in resources:
        if r.kind == "endpoint_config" and r.name == config_name:
            return r.attrs["ProductionVariants"][0]["InstanceType"]
    return None


def _endpoint_of(r: Resource) -> str:
    return r.attrs["ResourceId"].split("/")[1]


def _superseded(
    desired: list[Resource], state: State, config: DeployConfig, component: str
) -> list[Resource]:
    wanted = {(r.kind, r.name) for r in desired}
    prefix = f"{config.name}-{component}-"
    tag_key, tag_value = config.tag["Key"], config.tag["Value"]
    old = [  # subscriptions of our alarm topic that the config no longer names
        Resource(k, name, have.attrs, action="delete", arn=have.arn,
                 changes=["not in deploy.alarm_subscriptions"])
        for (k, name), have in sorted(state.items())
        if k == "sns_subscription" and (k, name) not in wanted
        and not have.attrs.get("_Pending")  # SNS removes unconfirmed ones after 3 days itself
    ]  # fmt: skip
    for kind in ("endpoint_config", "sagemaker_model"):  # configs first: they name the models
        for (k, name), have in sorted(state.items()):
            if k != kind or (k, name) in wanted or not name.startswith(prefix):
                continue
            if (have.tags or {}).get(tag_key) != tag_value:
                continue
            old.append(
                Resource(
                    k,
                    name,
                    {},
                    action="delete",
                    arn=have.arn,
                    changes=["superseded by this deploy"],
                )
            )
    return old
