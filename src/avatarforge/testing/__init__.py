"""What tests, benchmarks and the demos stand on, kept apart from the product's steps.

- :mod:`.samples`    sample selfies (variants of a public-domain portrait) and hostile uploads,
  with what preprocessing must make of each
- :mod:`.datasets`   a small training folder in the preprocess contract, without preprocessing
- :mod:`.aws_local`  AWS without AWS: a real moto server on a loopback port and its environment

No step of the data's path imports this package; the CLI (``avatarforge samples``), the demos,
``tests/`` and ``bench/`` do.
"""
