# kvstore: `kvstore serve` and `kvstore worker` (and every other kvstore command) on CPU torch.
#   docker build -t kvstore .
#   docker run --rm --shm-size=2g kvstore serve --listen 0.0.0.0:50051
# docker-compose.yml runs the service, a model worker and Redis from this image.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# torch first, in a layer of its own (it changes far less often than kvstore): the CPU wheel.
# The default index would install a CUDA build (several GB) that this image cannot use.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvstore ./kvstore
COPY tiers ./tiers
COPY client ./client
# The worker extra (transformers) serves `kvstore worker`; torch is already satisfied above.
RUN pip install ".[worker]" && rm -rf /src

# Not root. /data/g3 exists in the image, owned by kvstore, so that a fresh named volume mounted
# there (docker-compose.yml) starts out writable by it.
RUN useradd --system --uid 10001 --create-home --home-dir /home/kvstore kvstore \
    && mkdir -p /data/g3 \
    && chown -R kvstore:kvstore /data
USER kvstore
WORKDIR /data

EXPOSE 50051 9464
ENTRYPOINT ["kvstore"]
CMD ["--help"]
