# Triton (with the Python backend) + torch + this package:
#   docker build -f manifests/images/triton.Dockerfile .
# The model repository is mounted (spec.model.volume) or fetched by Triton (s3://, gs://,
# as://); examples/tiny.yaml expects it at /models. Baking the tiny model in with
# `autoglm model build` comes with the model-repository issue.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY model_repo ./model_repo
RUN pip install torch && pip install . && mkdir -p /models && chown 1000:1000 /models
USER 1000:1000
