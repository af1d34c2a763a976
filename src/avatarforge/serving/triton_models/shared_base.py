"""The shared base model (``sd_base_<hash>``): one pipeline, every user's adapter, over BLS.

It lives in no repository: the first user model (or model_setup) starts it with
``pb_utils.load_model(files={"file:1/model.py": bootstrap.SHARED_BASE_MODEL_PY})``, a one-line
model.py that imports this module in the serving environment (EXECUTION_ENV_PATH), so it is
loaded once per server however many user models forward to it, and always matches the
avatarforge installed there. ``initialize()`` returns in seconds: the base weights are fetched
and checked (the ensure-step, from the instance's AVATARFORGE_BASE_SOURCE) and the pipeline
loaded in a thread (:class:`~avatarforge.serving.shared_base.LoadingSharedBase`); meanwhile
requests are answered "loading, retry", which the user models wait out.
"""

import json
import logging

import triton_python_backend_utils as pb_utils

from avatarforge.serving import schema
from avatarforge.serving.bootstrap import error_code
from avatarforge.serving.config import ModelParams
from avatarforge.serving.shared_base import LoadingSharedBase, SharedBase, error_message


class TritonPythonModel:
    def initialize(self, args):
        # the library's progress and refusals in Triton's log (the stub's stderr)
        logging.basicConfig(level=logging.INFO, format="avatarforge %(name)s: %(message)s")
        params = ModelParams.of_model(args)
        self.inputs = [i["name"] for i in json.loads(args["model_config"])["input"]]
        self.output = schema.GENERATED_IMAGE.name
        kind, device = args["model_instance_kind"], args.get("model_instance_device_id", "0")
        self.model = LoadingSharedBase(
            lambda: SharedBase.from_params(params, kind, device, pb_utils=pb_utils)
        )

    def execute(self, requests):
        batch = []
        for request in requests:
            tensors = {n: pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs}
            batch.append({n: t.as_numpy() for n, t in tensors.items() if t is not None})
        responses = []
        for result in self.model.handle(batch):
            message = error_message(result)
            if message is not None:
                error = pb_utils.TritonError(message, error_code(message, pb_utils))
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                out = pb_utils.Tensor(self.output, result)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        if self.model.model is not None and self.model.model.counters is not None:
            self.model.model.counters.flush()
