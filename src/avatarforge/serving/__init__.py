"""Serving: the Triton side of the library (schema, configs, package, shared base, client).

The Triton model.py files (:mod:`.triton_models`, package data) stay thin and call into these
modules; everything else here is importable and tested outside any server. A user model runs
under a bare Python on the instance and imports only :mod:`.bootstrap` (standard library);
the shared base and model_setup run in the serving environment with the whole library.
"""
