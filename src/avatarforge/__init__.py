"""avatarforge: personal avatars from selfies, served from one Triton multi-model endpoint."""

import os

# transformers warns at import time that torchvision is absent (we do not need it); say so
# before anything imports it. Users can still raise the level with TRANSFORMERS_VERBOSITY.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
