#!/usr/bin/env bash
# Build the serving environment inside the SageMaker Triton image it will run in, and write
# build/envs/image/serve-env-py<X.Y>.tar.gz (conda-pack), ready for
#   avatarforge deploy mme --env-tarball build/envs/image/serve-env-py<X.Y>.tar.gz
# Usage: conda_envs/build_in_image.sh [TRITON_TAG]   (default: deploy's default, 25.09-py3)
# Needs a running Docker engine (BuildKit) and pull access to the SageMaker Triton image:
#   aws ecr get-login-password --region us-east-1 | docker login --username AWS \
#       --password-stdin 763104351884.dkr.ecr.us-east-1.amazonaws.com
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-25.09-py3}"
registry="${TRITON_REGISTRY:-763104351884.dkr.ecr.us-east-1.amazonaws.com}"
python="${PYTHON:-.venv/bin/python}"

if ! command -v docker >/dev/null 2>&1; then
  echo "build_in_image.sh: docker is not installed; run this where a Docker engine runs" >&2
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "build_in_image.sh: no Docker engine answers here (docker info failed): the env must be" >&2
  echo "built inside the Triton image ${registry}/sagemaker-tritonserver:${tag}, so run this" >&2
  echo "on a machine with a running engine (e.g. the build host that pushes the training image)" >&2
  exit 2
fi
rm -rf build/dist
"$python" -m pip wheel --no-deps --quiet --wheel-dir build/dist .
docker build -f conda_envs/Dockerfile \
  --build-arg "TRITON_REGISTRY=${registry}" --build-arg "TRITON_TAG=${tag}" \
  --output type=local,dest=build/envs/image .
ls -l build/envs/image/serve-env-py*.tar.gz
