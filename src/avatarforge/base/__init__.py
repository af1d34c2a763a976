"""The base model every step shares: the embedded tiny SD 2.1-shaped base, or a real one.

The reference implementation trained on one SD 2.1 variant and served another. Here a base is
always a :class:`~.identity.BaseInfo` — an id plus a content hash of its weights — recorded in
every adapter and checked when the adapter is loaded.

- :mod:`.identity`  what identifies a base: :class:`~.identity.BaseInfo`, its content hash,
  the check that an adapter was trained on it; :class:`~.identity.BaseError`
- :mod:`.config`    which base to use (:class:`~.config.BaseConfig`) and
  :func:`~.config.resolve_base`: find, build or fetch it
- :mod:`.build`     a diffusers base folder from components, with SD 2.x's tokenizer (the real
  CLIP vocabulary) and noise schedule
- :mod:`.tiny`      the embedded tiny base, built from configs with seeded random weights
- :mod:`.hub`       fetching a real base from the model hub (only when allowed), or finding
  one in the local hub cache
- :mod:`.importer` a real SD 2.x base checked (architecture, prediction type for its size,
  the download's hashes) and written as the fp16 folder every step loads
- :mod:`.pipeline`  a StableDiffusionPipeline of a base, on the best device
- :mod:`.logs`      silencing the hub libraries' chatter
"""
