#!/usr/bin/env bash
# `make training-image`: build avatarforge's wheel into a build context, then the LMI training
# image with docker where an engine runs. Where none runs (our development machines), the
# wheel is still built and checked, and the script says why it stops and exits 2.
#
# Environment: IMAGE (tag, default avatarforge-training:<version>), CONFIG (a deploy.json: its
# region and lmi_image_tag pick the LMI image, as the sagemaker SDK lists it; default
# us-east-1), LMI_REPOSITORY and LMI_TAG (a base image of your own instead), PYTHON (default
# .venv/bin/python).
#
# The docker CLI, not the `docker` Python package: docker-py drives only the legacy builder
# (docker/docker-py#2230: no BuildKit), which Docker deprecates, and its "no engine" error is a
# urllib3 traceback text; the CLI builds with BuildKit, uses the same credential helpers as
# `docker login`, and its errors name the failing step. This script says what to do around them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$repo/.venv/bin/python}"
context="${AVATARFORGE_BUILD:-$repo/build}/training-image"

rm -rf "$context"
mkdir -p "$context/wheels" "$context/source"
# Built from a copy, so setuptools' build/ and egg-info never land in the checkout.
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/src" "$context/source/"
find "$context/source" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
# --no-build-isolation: setuptools comes from the venv (no download); --no-deps: only ours.
"$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$context/wheels" \
    "$context/source"
rm -rf "$context/source"
wheels=("$context"/wheels/avatarforge-*.whl)
if [[ ${#wheels[@]} -ne 1 || ! -f ${wheels[0]} ]]; then
    echo "training-image: expected one avatarforge wheel in $context/wheels" >&2
    exit 1
fi
wheel="$(basename "${wheels[0]}")"
cp "$here/Dockerfile" "$here/serving.properties" "$here/model.py" "$context/"
echo "training-image: build context ready in $context (wheel $wheel)"

# The LMI image for the deployment's region, from the sagemaker SDK's table.
if [[ -z "${LMI_REPOSITORY:-}" ]]; then
    lmi="$("$(dirname "$python")/avatarforge" deploy images ${CONFIG:+--config "$CONFIG"} \
        | awk '$1 == "lmi" {print $2}')"
    if [[ -z "$lmi" ]]; then
        echo "training-image: no LMI image URI (see the error above)" >&2
        exit 1
    fi
    LMI_REPOSITORY="${lmi%:*}"
    LMI_TAG="${lmi##*:}"
fi
registry="${LMI_REPOSITORY%%/*}"
region="$(sed -n 's/^[0-9]*\.dkr\.ecr\.\([a-z0-9-]*\)\.amazonaws\.com$/\1/p' <<<"$registry")"
login="aws ecr get-login-password --region ${region:-<region>} | docker login --username AWS --password-stdin $registry"
echo "training-image: FROM $LMI_REPOSITORY:${LMI_TAG:-<Dockerfile default>}"

if ! command -v docker >/dev/null 2>&1; then
    echo "training-image: cannot build the image here: the docker client is not installed." >&2
    echo "  Run 'make training-image' on a machine with Docker; the context above is complete." >&2
    exit 2
fi
if ! docker info >/dev/null 2>&1; then
    echo "training-image: cannot build the image here: no Docker engine runs on this machine" >&2
    echo "  ('docker info' failed). Run 'make training-image' where one does, logged in to the" >&2
    echo "  LMI registry: $login" >&2
    exit 2
fi

version="${wheel#avatarforge-}"
version="${version%%-*}"
image="${IMAGE:-avatarforge-training:$version}"
args=(--build-arg "WHEEL=$wheel" --build-arg "LMI_REPOSITORY=$LMI_REPOSITORY")
[[ -n "${LMI_TAG:-}" ]] && args+=(--build-arg "LMI_TAG=$LMI_TAG")
if ! docker build "${args[@]}" -t "$image" "$context"; then
    echo "training-image: docker build failed (its error is above). If it could not pull" >&2
    echo "  $LMI_REPOSITORY (unauthorized, no basic auth credentials, denied), log in: $login" >&2
    exit 1
fi
echo "training-image: built $image"
