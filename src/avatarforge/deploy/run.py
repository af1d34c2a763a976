"""One deploy command from start to end: local assets -> what exists -> plan -> apply.

``clients=None`` plans without AWS (``--dry-run``): no credentials, no network, planned
against "nothing exists". With clients, the plan compares with what exists in the account.
"""

from __future__ import annotations

from .apply import Progress, apply
from .assets import base_asset, prepare_mme_assets
from .aws import Clients, account_id
from .config import DeployConfig
from .mme import plan_mme
from .plan import Plan, plan_destroy
from .state import discover, read_state
from .training import plan_training

COMMANDS = ("mme", "training", "api", "destroy")


def make_plan(
    command: str,
    config: DeployConfig,
    clients: Clients | None = None,
    *,
    create_role: bool = False,
    delete_data: bool = False,
) -> Plan:
    """The plan of ``command`` ("mme", "training" or "destroy") for ``config``.

    Raises AssetError (a local file is missing or unfit), DeployError (AWS) or ConfigError.
    """
    if command == "destroy":
        if clients is None:
            raise ValueError("destroy lists what exists: it needs AWS clients")
        account = account_id(clients)
        found, notes = discover(clients, config, account, delete_data=delete_data)
        return plan_destroy(config, found, account=account, notes=notes)
    if command == "mme":
        assets = prepare_mme_assets(config)

        def build(state=None, account=""):
            return plan_mme(config, assets, state, account=account, create_role=create_role)
    elif command == "training":
        base = base_asset(config.base)

        def build(state=None, account=""):
            return plan_training(config, base, state, account=account, create_role=create_role)
    elif command == "api":  # the optional HTTP API: its IAM role (deploy/api.py)
        from .api import plan_api

        def build(state=None, account=""):
            return plan_api(config, state, account=account, create_role=create_role)
    else:
        raise ValueError(f"unknown deploy command {command!r} (one of {', '.join(COMMANDS)})")
    if clients is None:
        return build()
    account = account_id(clients)
    draft = build(account=account)  # names what to look up
    if not config.bucket:
        return draft  # blocked anyway; nothing to compare under a placeholder bucket
    state = read_state(clients, config, draft.resources, command, account)
    return build(state, account)


def execute(
    plan: Plan, clients: Clients, config: DeployConfig, *, progress: Progress | None = None
) -> list[str]:
    """Carry out ``plan`` (see :func:`avatarforge.deploy.aws.apply`)."""
    return apply(plan, clients, config, progress=progress)
