# tpserve for NVIDIA GPUs. Dockerfile.cpu is the same server for machines without GPUs; both keep one runtime
# contract (entrypoint and arguments, environment, user, port, model folder, health check), which
# tests/unit/test_container.py checks and then runs outside Docker on the demo model.
#
#   docker build -t tpserve:cuda .
#   docker run --gpus all --shm-size=2g -v $PWD/model:/opt/ml/model -p 8080:8080 tpserve:cuda
#
# /opt/ml/model holds serving.properties (option.tensor_parallel_degree = GPUs to split over), optionally a
# model.py, and the weights or a pre-sharded folder (`tpserve shard`). The server binds 0.0.0.0 inside the
# container: publish the port only where its clients are (or put the Ingress' authentication in front).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/docker/constraints.txt constraints.txt
# PyPI's torch for Linux x86_64 is the CUDA build: the CUDA runtime, cuDNN and NCCL come as nvidia-* wheels,
# so no CUDA base image is needed, only a host driver new enough for torch.version.cuda.
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0
# DeepSpeed from its sdist without compiled ops: AutoTP over NCCL needs none.
RUN pip install --no-cache-dir -c constraints.txt setuptools==84.2.1 wheel==0.48.0 ninja==1.13.2 \
        py-cpuinfo==9.0.0 numpy==2.4.6 packaging==26.4 psutil==7.2.2 hjson==3.1.0 \
    && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation -c constraints.txt deepspeed==0.19.8
COPY pyproject.toml README.md ./
COPY serving serving
COPY handlers handlers
COPY djl_python djl_python
# Open MPI comes from PyPI (the `mpi` extra puts mpirun into the venv): no apt packages at run time.
RUN pip install --no-cache-dir -c constraints.txt ".[mpi]"

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 1000 --user-group tpserve \
    && mkdir -p /opt/ml/model && chown tpserve:tpserve /opt/ml/model
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/tpserve \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/tpserve
USER 1000:1000
EXPOSE 8080
# Liveness: the front end answers. Readiness (every model loaded) is /health/ready, for orchestrators.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=4)"]
# DeepSpeed's shared-memory all-reduce and NCCL need more than Docker's 64 MB /dev/shm: run with --shm-size=2g.
# A model needs time to drain on `docker stop`: give it --stop-timeout as long as option.predict_timeout.
# Listening on 0.0.0.0: set TPSERVE_API_KEY (docker run -e TPSERVE_API_KEY=...) so every route but /ping and
# /health/* needs "Authorization: Bearer <key>"; without it the server logs a warning at start.
ENTRYPOINT ["tpserve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["-m", "deepspeed=/opt/ml/model"]
