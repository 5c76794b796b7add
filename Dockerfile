# tpserve on a CUDA host: `docker run --gpus all --shm-size=2g -p 8080:8080 -v /path/to/model:/opt/ml/model tpserve`
# The model directory holds serving.properties (and optionally model.py); weights may live in it or elsewhere.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
        openmpi-bin libopenmpi-dev && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
# torch first, the CUDA build matching the base image; then DeepSpeed without prebuilt CUDA ops (AutoTP needs none)
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cu128 && \
    pip install --no-cache-dir setuptools wheel ninja py-cpuinfo numpy packaging psutil hjson && \
    DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation deepspeed==0.19.8
WORKDIR /opt/tpserve
COPY pyproject.toml README.md ./
COPY serving serving
COPY handlers handlers
COPY djl_python djl_python
RUN pip install --no-cache-dir .

EXPOSE 8080
# Listening on 0.0.0.0: set TPSERVE_API_KEY (docker run -e TPSERVE_API_KEY=...) so every route but /ping and
# /health/* needs "Authorization: Bearer <key>"; without it the server logs a warning at start.
# DeepSpeed's shared-memory buffers need more than Docker's 64 MB /dev/shm: run with --shm-size=2g (or more).
ENTRYPOINT ["tpserve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["-m", "/opt/ml/model"]
