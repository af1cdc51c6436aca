# syntax=docker/dockerfile:1.7
# Lathe's two images, from one file:
#   docker build --target service -t lathe-service:0.1.0 .   # the API: slim, no torch
#   docker build --target trainer -t lathe-trainer:0.1.0 .   # the GPU trainer: CUDA runtime + torch
# Both run as UID/GID 1000 (the chart's and KubernetesSettings' default) with a read-only root
# filesystem: bytecode is compiled at build time, and HOME/TMPDIR point at writable mounts.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# torch 2.13.0 from PyPI is the CUDA 13.0 build (nvidia-cuda-runtime 13.0.x): match the runtime
# base to it. CUDA 13 needs an NVIDIA driver >= 580 on the nodes (docs/deploy.md).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
ARG TORCH_VERSION=2.13.0

FROM ${UV_IMAGE} AS uv

# ---- build: one wheel of the project, shared by both images -------------------------------------
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY service ./service
RUN uv build --wheel --out-dir /dist

# ---- service: the stateless API ----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS service
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp
RUN groupadd --gid 1000 lathe \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin lathe
COPY --from=uv /uv /usr/local/bin/uv
RUN --mount=from=build,source=/dist,target=/dist \
    uv venv /opt/venv \
 && uv pip install --no-cache --compile-bytecode --python /opt/venv/bin/python \
      "lathe[service] @ file://$(ls /dist/lathe-*.whl)" \
 && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the service image" >&2; exit 1; fi \
 && rm /usr/local/bin/uv
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["lathe"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# ---- trainer: one job per pod, one process per GPU ---------------------------------------------
FROM ${CUDA_IMAGE} AS trainer
ARG TORCH_VERSION
# Optional: another torch build, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# for nodes whose driver predates CUDA 13.
ARG TORCH_INDEX_URL=
# Optional: a folder of torch wheels mounted into the build (`make images` mounts a CPU wheel here).
ARG TORCH_FIND_LINKS=
# The torch build the image carries: cuda (PyPI's torch) or cpu (the stand-in image of `make images`).
# It picks the ONNX Runtime the caption jobs' taggers run on: a CUDA image swaps `onnxruntime` (CPU
# provider only) for `onnxruntime-gpu` (CUDA provider, CPU as fallback) at the version lathe's own
# requirement resolved to; the two packages install the same module and must not be installed together.
ARG TORCH_VARIANT=cuda
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/scratch \
    LATHE_CACHE_DIR=/cache/models \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Python comes from the base's own packages (Ubuntu 24.04: 3.12), never downloaded by uv at build time.
# Ubuntu 24.04 ships a user `ubuntu` with UID/GID 1000: the pods' 1000 is `lathe` here.
# Debian package versions follow the pinned base image (hadolint's DL3008 asks for per-package pins).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && if getent passwd 1000 >/dev/null; then userdel "$(getent passwd 1000 | cut -d: -f1)"; fi \
 && if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi \
 && groupadd --gid 1000 lathe \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /scratch --shell /usr/sbin/nologin lathe \
 && mkdir -p /scratch /cache/models \
 && chown 1000:1000 /scratch /cache/models
COPY --from=uv /uv /usr/local/bin/uv
RUN --mount=from=build,source=/dist,target=/dist \
    uv venv --no-python-downloads --python /usr/bin/python3 /opt/venv \
 && uv pip install --no-cache --compile-bytecode --python /opt/venv/bin/python \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple} \
      ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} \
      "torch==${TORCH_VERSION}" "lathe[trainer] @ file://$(ls /dist/lathe-*.whl)" \
 && if [ "$TORCH_VARIANT" = cuda ]; then \
      ort=$(/opt/venv/bin/python -c "import importlib.metadata as m; print(m.version('onnxruntime'))") \
      && uv pip uninstall --python /opt/venv/bin/python onnxruntime \
      && uv pip install --no-cache --compile-bytecode --python /opt/venv/bin/python "onnxruntime-gpu==$ort"; \
    elif [ "$TORCH_VARIANT" != cpu ]; then echo "TORCH_VARIANT must be cuda or cpu, not $TORCH_VARIANT" >&2; exit 1; fi \
 && rm /usr/local/bin/uv
USER 1000:1000
WORKDIR /scratch
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]
