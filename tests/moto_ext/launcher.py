"""moto's server with the two SageMaker gaps deploy needs filled, for the tests only.

Run as ``python launcher.py -H 127.0.0.1 -p PORT`` (the arguments of ``moto_server``). Before the
server starts, this process extends moto 5.2.5's SageMaker backend:

- instance types: moto validates endpoint-config instance types against an old hard-coded list
  without ``ml.g5.*``; here every type in botocore's own ``ProductionVariantInstanceType`` enum
  (the real API's list) is accepted as well, so the product's default (ml.g5.2xlarge) is what
  the tests deploy;
- ``UpdateEndpoint`` (moto answers 500 "not implemented"): switches the endpoint to the new
  endpoint config (its variants and data capture), as SageMaker does once an update finishes.

Nothing else changes: every other call runs moto's own code.
"""

from __future__ import annotations

import functools
import gzip
import json
import sys
from pathlib import Path
from typing import Any


@functools.cache
def real_instance_types() -> frozenset[str]:
    """Instance types the real CreateEndpointConfig accepts, read from botocore's service model."""
    import botocore

    models = Path(botocore.__file__).parent / "data" / "sagemaker"
    (path,) = sorted(models.glob("*/service-2.json*"))[-1:]
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return frozenset(json.loads(raw)["shapes"]["ProductionVariantInstanceType"]["enum"])


def extend_moto() -> None:
    """Patch moto's SageMaker backend and response handler in this process."""
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.sagemaker import models, responses
    from moto.sagemaker.exceptions import ValidationError

    original_validate = models.FakeEndpointConfig.validate_instance_type

    def validate_instance_type(self: Any, instance_type: str) -> None:
        if instance_type in real_instance_types():
            return
        original_validate(self, instance_type)  # moto's own error for anything else

    def update_endpoint(self: Any, endpoint_name: str, endpoint_config_name: str) -> Any:
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is None:
            arn = models.FakeEndpoint.arn_formatter(
                endpoint_name, self.account_id, self.region_name
            )
            raise ValidationError(message=f"Could not find endpoint '{arn}'.")
        config = self.describe_endpoint_config(endpoint_config_name)  # raises when missing
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = endpoint._process_production_variants(
            config["ProductionVariants"]
        )
        endpoint.data_capture_config = config["DataCaptureConfig"]
        endpoint.last_modified_time = utcnow()
        endpoint.endpoint_status = "InService"  # the real one passes through "Updating"
        return endpoint

    def update_endpoint_action(self: Any) -> ActionResult:
        endpoint = self.sagemaker_backend.update_endpoint(
            endpoint_name=self._get_param("EndpointName"),
            endpoint_config_name=self._get_param("EndpointConfigName"),
        )
        return ActionResult({"EndpointArn": endpoint.arn})

    models.FakeEndpointConfig.validate_instance_type = validate_instance_type
    models.SageMakerModelBackend.update_endpoint = update_endpoint
    responses.SageMakerResponse.update_endpoint = update_endpoint_action


def main(argv: list[str]) -> None:
    extend_moto()
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
