"""Serving: the Triton model repository's library side (schema, configs, shared base, client).

Triton model.py files stay thin and call into these modules; everything here except
``triton_sd_base.py`` (read as bytes and handed to ``pb_utils.load_model``) is importable and
tested outside any server.
"""
