# The operator and gateway image (`autoglm operator`, `autoglm gateway`; no torch), for those
# with a Docker engine:
#   docker build -f manifests/images/operator.Dockerfile -t autoglm/operator:0.1.0 .
# `make images` builds the same image without one (.ci/images.py): the Debian packages of
# packages.txt, the wheels pinned by hash in operator.lock (pyproject's dependencies plus
# the gateway's tritonclient[grpc] and numpy), the same paths, environment and user;
# tests/unit/test_image_lists.py checks that the two agree.
FROM debian:bookworm-slim AS base
COPY manifests/images/packages.txt /tmp/packages.txt
RUN apt-get update \
 && apt-get install -y --no-install-recommends $(sed 's/#.*//' /tmp/packages.txt) \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt \
 && echo 'autoglm:x:1000:1000:AutoGLM:/tmp:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'autoglm:x:1000:' >> /etc/group

FROM base AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3.11-venv
COPY manifests/images/operator.lock /tmp/requirements.lock
RUN python3.11 -m venv /opt/autoglm \
 && /opt/autoglm/bin/pip install --no-cache-dir --no-compile --no-deps --require-hashes \
      -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY operator /src/operator
# hash-based .pyc that Python never re-validates: the root filesystem is read-only in pods
RUN /opt/autoglm/bin/pip install --no-cache-dir --no-compile --no-deps /src \
 && /opt/autoglm/bin/pip uninstall -y -q pip setuptools \
 && /opt/autoglm/bin/python -m compileall -q -j0 --invalidation-mode unchecked-hash \
      /opt/autoglm/lib/python3.11/site-packages

FROM base
COPY --from=build /opt/autoglm /opt/autoglm
ENV PATH=/opt/autoglm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /tmp
USER 1000:1000
ENTRYPOINT ["autoglm"]
CMD ["operator"]
