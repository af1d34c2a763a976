"""Triton model of one user: packaged as ``<user>/1/model.py``; never imported by the library.

It runs under the Python that Triton's python backend stub embeds, with numpy and the standard
library only (the SageMaker Triton image has nothing else), so a resident user costs a ~20 MB
stub process. ``initialize()`` is :func:`avatarforge_bootstrap.start` (the copy of
``avatarforge.serving.bootstrap`` packaged beside this file): check the adapter, then make the
serving environment present and start the shared base in a thread. It holds no pipeline:
every request is forwarded to the shared base over BLS (:class:`avatarforge_bootstrap.UserModel`)
and answered.
"""

from pathlib import Path

import avatarforge_bootstrap as bootstrap
import numpy as np
import triton_python_backend_utils as pb_utils


def text_tensor(name, text, rows):
    """A BYTES input of ``rows`` rows, each holding ``text``."""
    return pb_utils.Tensor(name, np.full((rows, 1), text.encode(), dtype=object))


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.model = bootstrap.start(version_dir, args["model_config"], pb_utils, text_tensor)

    async def execute(self, requests):
        return await self.model.execute(requests)

    def finalize(self):
        self.model.counters.flush()
