# The operator and gateway image:  docker build -f manifests/images/operator.Dockerfile .
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install . && rm -rf /src
USER 1000:1000
ENTRYPOINT ["autoglm"]
CMD ["operator"]
