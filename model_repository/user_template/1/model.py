"""Triton model of one user: checks its adapter, then forwards to the shared base through BLS.

It holds no pipeline. ``initialize()`` runs the ensure-step (base + environment at the shared
path) and starts the shared base if no model has yet, so a restarted or scaled-out instance
needs no model_setup call first. Every request of a batch is forwarded and answered.
"""

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from avatarforge.serving import runtime, schema


class TritonPythonModel:
    def initialize(self, args):
        params = runtime.model_params(args)
        self.inputs = [i["name"] for i in json.loads(args["model_config"])["input"]]
        self.adapter = str(runtime.user_adapter(args["model_repository"], params)).encode()
        self.plan = runtime.plan_shared_base(params)
        self.plan.ensure_loaded(pb_utils)

    def _forward(self, request):
        tensors = [pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs]
        tensors = [t for t in tensors if t is not None]  # omitted optional inputs stay omitted
        rows = tensors[0].as_numpy().shape[0]
        adapter = np.full((rows, 1), self.adapter, dtype=object)
        tensors.append(pb_utils.Tensor(schema.ADAPTER.name, adapter))
        return pb_utils.InferenceRequest(
            model_name=self.plan.name,
            inputs=tensors,
            requested_output_names=[schema.GENERATED_IMAGE.name],
        )

    async def execute(self, requests):
        self.plan.ensure_loaded(pb_utils)  # per batch: it comes back if something unloaded it
        # all at once: the shared base's dynamic batcher sees the whole batch
        results = await asyncio.gather(*(self._forward(r).async_exec() for r in requests))
        responses = []
        for result in results:
            if result.has_error():
                error = pb_utils.TritonError(result.error().message())
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                out = pb_utils.get_output_tensor_by_name(result, schema.GENERATED_IMAGE.name)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
