# syntax=docker/dockerfile:1
# The server image that `qwenrun deploy k8s` manifests run: vLLM on CUDA, Ray (for engines that
# span nodes through KubeRay), qwenrun's OpenAI-compatible server and the tool plugins.
# It is not built by this repository's tests or CI (no Docker engine there); see docs/deploy.md.
#
#   docker build -t qwenrun-server:0.1.0 .
#   docker build --build-arg PLUGINS="plugins/qwenrun-weather plugins/qwenrun-rag" -t qwenrun-server:rag .
#
# The agent file comes at run time (a ConfigMap mounted at /etc/qwenrun), the weights from a volume
# or the Hugging Face Hub (HF_HOME), the API key from a Secret.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG VLLM_VERSION=0.26.0
ARG PLUGINS="plugins/qwenrun-weather plugins/qwenrun-calculator"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.12, and a C compiler with Python's headers: Triton builds small launchers at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The engine first: the largest layer, rebuilt only when its version changes. ray[default] brings
# `ray start` and the dashboard agent that KubeRay's probes of worker pods talk to.
RUN pip install "vllm==${VLLM_VERSION}" "ray[default]"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY qwenrun ./qwenrun
COPY plugins ./plugins
RUN pip install ".[server]" ${PLUGINS} && qwenrun tools

RUN useradd --create-home --uid 1000 qwenrun
USER 1000
WORKDIR /home/qwenrun
EXPOSE 8000
CMD ["qwenrun", "--help"]
