"""A local emulation of SageMaker multi-model endpoints (MME) on the real tritonserver.

SageMaker, given ``TargetModel=<user>.tar.gz``, copies ``s3://<prefix>/<user>.tar.gz`` to the
instance, untars it into ``/opt/ml/models/<hash>/model`` and asks Triton's SageMaker front end
to load it (``POST /models``); it evicts the least-recently-used model when memory runs short.
This package does the same against a tritonserver started with ``--allow-sagemaker``
(:func:`avatarforge.tritonserver.sagemaker.sagemaker_triton`):

- :mod:`.protocol`  the HTTP calls of Triton's SageMaker front end (load, unload, list, invoke)
- :mod:`.loader`    TargetModel -> fetch, safe extract, load, LRU eviction, invoke
- :mod:`.front`     a tiny SageMaker-runtime-like HTTP front (``/endpoints/<name>/invocations``)
- :mod:`.generate`  prompt in, images out through the front (the serving schema as KServe JSON)
"""

from .loader import (
    InvalidTargetModelError,
    LoadedModel,
    MMEConfig,
    MMEError,
    ModelLoadError,
    MultiModelLoader,
    UnknownTargetModelError,
    model_hash,
)
from .protocol import SageMakerTritonClient, TritonMMEError

__all__ = [
    "InvalidTargetModelError",
    "LoadedModel",
    "MMEConfig",
    "MMEError",
    "ModelLoadError",
    "MultiModelLoader",
    "SageMakerTritonClient",
    "TritonMMEError",
    "UnknownTargetModelError",
    "model_hash",
]
