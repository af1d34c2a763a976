"""What model_setup does at load time, as plain functions (no Triton import).

model_setup runs in the serving environment with the full library: it fetches and checks the
base (the ensure-step of :mod:`.shared_files`), learns its hash, and starts the shared base
through the same :class:`~avatarforge.serving.bootstrap.SharedBaseModel` a user model uses. User
models do not come here: they start the shared base from their packaged template (see
:mod:`.bootstrap`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..base.identity import BaseInfo
from . import bootstrap
from .shared_files import ensure_base
from .triton_config import sd_base_config

__all__ = ["SetupPlan", "plan_shared_base"]


@dataclass(frozen=True)
class SetupPlan:
    shared_base: bootstrap.SharedBaseModel
    base: BaseInfo

    def ensure_loaded(self, pb_utils, model: str = "model_setup") -> None:
        """Start the shared base, unless the server loads ``model`` as it starts (then the
        first user request starts it: see :func:`.bootstrap.loaded_at_start`)."""
        if not bootstrap.loaded_at_start(model, bootstrap.server_cmdline()):
            self.shared_base.ensure_loaded(pb_utils)

    def status(self) -> str:
        config = json.loads(self.shared_base.config_json)
        return json.dumps(
            {"shared_base": self.shared_base.name, **self.base.to_dict(), "config": config}
        )


def plan_shared_base(environ: dict | None = None) -> SetupPlan:
    """Make the base present at the instance's shared path and say how to start its model."""
    bootstrap.check_control_mode(bootstrap.server_cmdline())
    instance = bootstrap.Instance(environ)
    base = ensure_base(instance.base_source, instance.shared_dir)
    template = sd_base_config(base.base_id, base.content_hash)
    shared_base = bootstrap.SharedBaseModel.from_template(
        template, bootstrap.ensure_env(instance), instance.shared_dir
    )
    return SetupPlan(shared_base, base)
