"""The demos: every step of the data's path run end to end on this machine, on the tiny base
and the sample selfies. Each calls the same library functions the CLI calls and prints nothing:
it reports each step through ``on_step``/``on_done`` callbacks (the CLI prints them).

- :mod:`.local`    ``avatarforge demo`` (``make demo``): base, preprocess, train, generate with
  diffusers, package, tritonserver, contact sheet
- :mod:`.service`  ``avatarforge demo-service``: one training job of the service against a local
  S3 (moto), then its tarball served by the local MME
- :mod:`.cloud`    ``avatarforge demo-cloud``: the whole deployed system locally (moto S3/SNS/SQS,
  the async training endpoint, the MME): submit -> notification -> generate
"""
