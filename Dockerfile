# syntax=docker/dockerfile:1
# kernl images, two targets from one file (docs/deployment.md has the whole story):
#
#   compile  kernl[compile] (transformers, click, gcc for Triton's launcher build): run it on
#            a GPU host of the type you will serve on, to turn a model into an artifact.
#   runtime  the runtime alone plus Ray Serve, and one artifact folder: `kernl serve`.
#            No transformers, no kernl compile extras, no C compiler.
#
#   docker build --target compile -t kernl-compile .
#   docker run --gpus all -v "$PWD":/work kernl-compile /work/my-bert -o /work/bert.kernl \
#       --buckets "batch=1,8,32 seq=16:512" --dtype fp16
#   docker build --target runtime --build-arg ARTIFACT=bert.kernl -t bert-serve .
#   docker run --gpus all --shm-size=2g -p 8000:8000 bert-serve --replicas 1
#
# Layers go from least to most often changed: OS packages, pinned Python dependencies,
# kernl's sources, then the artifact.

ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# --- shared base: Python and kernl's runtime dependencies ------------------------------------
FROM ${CUDA_BASE} AS python-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# kernl's `dependencies` (pyproject.toml), pinned to the versions the team tests with.
RUN pip install "torch==2.13.0" "triton==3.6.0" "numpy<2.4" "safetensors>=0.4" "msgpack>=1.0"

# --- compile: kernl-compile on a GPU build host ----------------------------------------------
FROM python-base AS compile
# Triton builds its launcher with a C compiler at compile time (never at serving time).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install "transformers>=5,<6" "click>=8.1"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernl/ kernl/
RUN pip install --no-deps .
WORKDIR /work
ENTRYPOINT ["kernl-compile"]

# --- runtime: kernl serve on Ray Serve, one artifact -----------------------------------------
FROM python-base AS runtime
# kernl's `serve` extra (pyproject.toml), and the user that serves.
RUN pip install "ray[serve]==2.60.0" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin kernl
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernl/ kernl/
RUN pip install --no-deps . && rm -rf /src
ARG ARTIFACT
RUN test -n "${ARTIFACT}" \
    || { echo "build with --build-arg ARTIFACT=path/to/model.kernl (inside the context)"; exit 1; }
COPY --chown=10001:10001 ${ARTIFACT} /artifact
USER 10001
WORKDIR /home/kernl
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "kernl.serving", "/artifact", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--replicas", "1"]
