"""The real tritonserver, in one place: where it is, how it starts and stops, and its SageMaker
front end.

- :mod:`.install`    the binary, the python backend and its stub, from the nvidia-pytriton wheel
- :mod:`.launch`     start it on loopback ports (explicit model control), always stopped;
  ports in use and failed listeners as errors naming them
- :mod:`.sagemaker`  the SageMaker multi-model front end's flags, and a launcher for it
- :mod:`.loopback`   the LD_PRELOAD shim that keeps the SageMaker port on 127.0.0.1
"""
