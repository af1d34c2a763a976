"""Triton model_setup: warm the shared base when the server starts (see the module below).

Served from this repository by a tritonserver whose EXECUTION_ENV_PATH (config.pbtxt) is an
environment with avatarforge installed; `avatarforge serve local-triton` renders that for you.
"""

from avatarforge.serving.triton_models.model_setup import TritonPythonModel  # noqa: F401
