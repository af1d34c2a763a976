"""Triton model of one user: packaged as ``<user>/1/model.py``; never imported by the library.

It runs under the Python that Triton's python backend stub embeds, with numpy and the standard
library only (the SageMaker Triton image has nothing else), so a resident user costs a ~20 MB
stub process. ``initialize()`` is :func:`avatarforge_bootstrap.start` (the copy of
``avatarforge.serving.bootstrap`` packaged beside this file): check the adapter, make the
serving environment present, start the shared base if no model has yet. It holds no pipeline:
every request of a batch is forwarded to the shared base over BLS with the user's adapter
folder, and answered.
"""

import asyncio
import json
import time
from pathlib import Path

import avatarforge_bootstrap as bootstrap
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.output = config["output"][0]["name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        params = bootstrap.model_params(args["model_config"])
        adapter, self.base = bootstrap.start(version_dir, params, pb_utils)
        self.adapter = str(adapter).encode()
        self.timeout_s = self.base.request_timeout_s

    def _forward(self, request, deadline):
        tensors = [pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs]
        tensors = [t for t in tensors if t is not None]  # omitted optional inputs stay omitted
        rows = tensors[0].as_numpy().shape[0]
        adapter = np.full((rows, 1), self.adapter, dtype=object)
        tensors.append(pb_utils.Tensor(bootstrap.ADAPTER_INPUT, adapter))
        if deadline:
            when = np.full((rows, 1), deadline.encode(), dtype=object)
            tensors.append(pb_utils.Tensor(bootstrap.DEADLINE_INPUT, when))
        return pb_utils.InferenceRequest(
            model_name=self.base.name, inputs=tensors, requested_output_names=[self.output]
        )

    async def execute(self, requests):
        self.base.ensure_loaded(pb_utils)  # per batch: it comes back if something unloaded it
        sent = time.time()
        # past it the client has stopped waiting: the shared base skips or stops the work
        deadline = f"{sent + self.timeout_s:.3f}" if self.timeout_s else ""
        # all at once: the shared base's dynamic batcher sees the whole batch
        calls = (self._forward(r, deadline).async_exec() for r in requests)
        results = await asyncio.gather(*calls)
        died = [r.has_error() and bootstrap.base_died(r.error().message()) for r in results]
        if any(died):
            self.base.restart(pb_utils, failed_at=sent)
        responses = []
        for result, dead in zip(results, died):
            if result.has_error():
                # the shared base's message; its code from the message, as BLS loses it
                message = bootstrap.BASE_RESTARTED if dead else result.error().message()
                error = pb_utils.TritonError(message, bootstrap.error_code(message, pb_utils))
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                out = pb_utils.get_output_tensor_by_name(result, self.output)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
