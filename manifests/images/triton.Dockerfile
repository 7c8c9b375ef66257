# Triton (tritonserver 2.51 from the nvidia-pytriton wheel, Python backend) + torch + this
# package, and the tiny model at /models, for those with a Docker engine:
#   docker build -f manifests/images/triton.Dockerfile -t autoglm/triton:0.1.0 .
#   docker build -f manifests/images/triton.Dockerfile --build-arg VARIANT=gpu \
#     -t autoglm/triton:0.1.0-gpu .
# VARIANT=cpu leaves out the CUDA wheels (torch runs on CPU without them), gpu keeps them.
# `make images` builds the same images without Docker (.ci/images.py): the Debian packages
# of packages.txt, the wheels pinned by hash in triton-<VARIANT>.lock, the same paths,
# environment and user; tests/unit/test_image_lists.py checks that the two agree.
# Pods run `autoglm triton-serve`, which starts this image's tritonserver and loads one
# model at one pinned version. Other repositories are mounted (spec.model.volume) or
# fetched by Triton (s3://, gs://, as://).
FROM debian:bookworm-slim AS base
COPY manifests/images/packages.txt /tmp/packages.txt
RUN apt-get update \
 && apt-get install -y --no-install-recommends $(sed 's/#.*//' /tmp/packages.txt) \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt \
 && echo 'autoglm:x:1000:1000:AutoGLM:/tmp:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'autoglm:x:1000:' >> /etc/group

FROM base AS build
ARG VARIANT=cpu
RUN apt-get update && apt-get install -y --no-install-recommends python3.11-venv
COPY manifests/images/triton-${VARIANT}.lock /tmp/requirements.lock
RUN python3.11 -m venv /opt/autoglm \
 && /opt/autoglm/bin/pip install --no-cache-dir --no-compile --no-deps --require-hashes \
      -r /tmp/requirements.lock
# Triton's Python backend with the Python 3.11 stub (DESIGN.md §7), made at build time:
# the root filesystem is read-only in the pods.
RUN t=/opt/autoglm/lib/python3.11/site-packages/pytriton/tritonserver \
 && mkdir -p /opt/tritonserver/backends/python \
 && cp $t/backends/python/libtriton_python.so $t/backends/python/triton_python_backend_utils.py \
       $t/python_backend_stubs/3.11/triton_python_backend_stub /opt/tritonserver/backends/python/ \
 && ln -s $t/bin/tritonserver /usr/local/bin/tritonserver
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY model_repo /src/model_repo
ENV PATH=/opt/autoglm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    AUTOGLM_TRITONSERVER=/opt/autoglm/lib/python3.11/site-packages/pytriton/tritonserver/bin/tritonserver \
    AUTOGLM_TRITON_BACKENDS=/opt/tritonserver/backends \
    AUTOGLM_MODEL_SOURCE=/src/model_repo \
    LD_LIBRARY_PATH=/opt/autoglm/lib/python3.11/site-packages/nvidia_pytriton.libs
# hash-based .pyc that Python never re-validates: the root filesystem is read-only in pods
RUN pip install --no-cache-dir --no-compile --no-deps /src \
 && pip uninstall -y -q pip setuptools \
 && python -m compileall -q -j0 --invalidation-mode unchecked-hash \
      /opt/autoglm/lib/python3.11/site-packages \
 && autoglm model build /models --version 1 \
 && chown -R 1000:1000 /models

FROM base
COPY --from=build /opt/autoglm /opt/autoglm
COPY --from=build /opt/tritonserver /opt/tritonserver
COPY --from=build /usr/local/bin/tritonserver /usr/local/bin/tritonserver
COPY --from=build /src/model_repo /src/model_repo
COPY --from=build /models /models
ENV PATH=/opt/autoglm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    AUTOGLM_TRITONSERVER=/opt/autoglm/lib/python3.11/site-packages/pytriton/tritonserver/bin/tritonserver \
    AUTOGLM_TRITON_BACKENDS=/opt/tritonserver/backends \
    AUTOGLM_MODEL_SOURCE=/src/model_repo \
    LD_LIBRARY_PATH=/opt/autoglm/lib/python3.11/site-packages/nvidia_pytriton.libs
WORKDIR /tmp
USER 1000:1000
ENTRYPOINT ["autoglm"]
CMD ["--help"]
