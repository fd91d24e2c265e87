# fedjewel: one image for the coordinator and the regional nodes.
#   docker compose up --build        (see docker-compose.yml and README "Deployment")
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch from PyTorch's own index: the default wheel on PyPI
# pulls several GB of CUDA libraries that neither service uses.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY coordinator ./coordinator
COPY regional_node ./regional_node
COPY shared ./shared
COPY migrations ./migrations
# Editable install: the services find migrations/ next to their packages.
RUN pip install -e .

RUN useradd --create-home --uid 10001 fedjewel \
    && mkdir -p /data \
    && chown fedjewel /data
USER fedjewel
VOLUME ["/data"]
EXPOSE 8000 8100

# Each compose service sets its own command; this default runs a coordinator.
CMD ["python", "-m", "coordinator", "--host", "0.0.0.0", "--port", "8000"]
