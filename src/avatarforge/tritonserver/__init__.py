"""The real tritonserver, in one place: where it is, how it starts and stops, and its SageMaker
front end.

- :mod:`.install`    the binary, the python backend and its stub, from the nvidia-pytriton wheel
- :mod:`.launch`     start it on loopback ports (explicit model control), always stopped;
  ports in use and failed listeners as errors naming them; stopped if it listens beyond loopback
- :mod:`.sagemaker`  the SageMaker image's serve-script flags (MME mode), and a launcher for it
- :mod:`.control_key` the key that opens the APIs that change the server (load a model, ...)
- :mod:`.loopback`   the LD_PRELOAD library that keeps the SageMaker port on 127.0.0.1 and the
  key off the command line, checked before use; what a process listens on, from /proc
"""
