"""The Triton ``model.py`` files of our models, shipped as package data.

They run inside Triton's python backend, never in the library: ``user.py`` is copied into every
user package as ``1/model.py`` (it runs under the stub's bare Python beside a copy of
:mod:`avatarforge.serving.bootstrap`), ``shared_base.py`` is what the shared base model imports
in the serving environment, and ``model_setup.py`` is model_setup's. Read them with
:func:`source`, which works from a source checkout and from an installed wheel alike.
"""

from __future__ import annotations

from importlib import resources


def source(name: str) -> bytes:
    """The bytes of one model file of this package (``"user.py"``, ``"model_setup.py"``, ...)."""
    return resources.files(__package__).joinpath(name).read_bytes()


def bootstrap_source() -> bytes:
    """The bytes of :mod:`avatarforge.serving.bootstrap`, packaged beside each user model."""
    return resources.files(__package__).parent.joinpath("bootstrap.py").read_bytes()
