"""Triton model_setup (local repository only): warm the shared base when the server starts.

It runs in the serving environment (EXECUTION_ENV_PATH). It makes sure the base weights and the
serving environment are at the instance's shared path and starts the shared base model, so the
first user request does not wait for them. It is an optimisation, not a prerequisite: every user
model starts the shared base itself.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from avatarforge.serving.setup_plan import plan_shared_base


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.output = config["output"][0]["name"]
        self.plan = plan_shared_base()
        self.plan.ensure_loaded(pb_utils, args["model_name"])

    def execute(self, requests):
        # Answers what it made sure of: the shared base's name, base hash and config.
        status = pb_utils.Tensor(self.output, np.array([self.plan.status().encode()], dtype=object))
        return [pb_utils.InferenceResponse(output_tensors=[status]) for _ in requests]
