# Triton (with the Python backend) + torch + this package, and the tiny model at /models:
#   docker build -f manifests/images/triton.Dockerfile .
# Pods run `autoglm triton-serve`, which starts this image's tritonserver and loads one
# model at one pinned version. Other repositories are mounted (spec.model.volume) or
# fetched by Triton (s3://, gs://, as://).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    AUTOGLM_TRITONSERVER=/opt/tritonserver/bin/tritonserver \
    AUTOGLM_TRITON_BACKENDS=/opt/tritonserver/backends \
    AUTOGLM_MODEL_SOURCE=/src/model_repo
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY model_repo ./model_repo
RUN pip install '.[model]' \
 && autoglm model build /models --version 1 \
 && chown -R 1000:1000 /models
USER 1000:1000
