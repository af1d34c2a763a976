"""The shared base model (``sd_base_<hash>``): one pipeline, every user's adapter, over BLS.

It lives in no repository: the first user model (or model_setup) starts it with
``pb_utils.load_model(files={"file:1/model.py": bootstrap.SHARED_BASE_MODEL_PY})``, a one-line
model.py that imports this module in the serving environment (EXECUTION_ENV_PATH), so it is
loaded once per server however many user models forward to it, and always matches the
avatarforge installed there. It fetches and checks the base weights itself (the ensure-step,
with the full library) from the instance's AVATARFORGE_BASE_SOURCE.
"""

import json

import triton_python_backend_utils as pb_utils

from avatarforge.serving import schema
from avatarforge.serving.bootstrap import CLIENT_FAULT_PREFIX, RETRY_PREFIX
from avatarforge.serving.config import ModelParams
from avatarforge.serving.shared_base import SharedBase


class TritonPythonModel:
    def initialize(self, args):
        params = ModelParams.of_model(args)
        self.inputs = [i["name"] for i in json.loads(args["model_config"])["input"]]
        self.output = schema.GENERATED_IMAGE.name
        self.model = SharedBase.from_params(
            params, args["model_instance_kind"], args.get("model_instance_device_id", "0")
        )

    def execute(self, requests):
        batch = []
        for request in requests:
            tensors = {n: pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs}
            batch.append({n: t.as_numpy() for n, t in tensors.items() if t is not None})
        responses = []
        for result in self.model.handle(batch):
            if isinstance(result, Exception):
                # the caller's mistake is INVALID_ARG (HTTP 400), ours INTERNAL (500); the
                # prefix carries that through BLS to the user model (which loses the code)
                if result.client_fault:
                    message = CLIENT_FAULT_PREFIX + str(result)
                    error = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
                elif result.status == 503:
                    message = RETRY_PREFIX + str(result)
                    error = pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE)
                else:
                    error = pb_utils.TritonError(str(result), pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                out = pb_utils.Tensor(self.output, result)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
