# Conveyor worker image: `docker build -t conveyor .`, run by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A system user without a login shell: the worker runs pipeline code, never as root.
RUN groupadd --system conveyor && useradd --system --gid conveyor --home-dir /app conveyor

WORKDIR /app
# The package first (a layer that changes only with the code), then what runs beside it.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[api,postgres]' && rm -rf src
COPY config ./config
COPY worker.py ./
# The example pipelines; your own image adds yours (`pip install yourapp`, or COPY them
# here) and names them in CONVEYOR_WORKER__PIPELINES. `conveyor worker` imports them with
# the working directory on sys.path, as Celery does.
COPY examples ./examples
# logs/ for the rotating file of config/production.yaml (logging.file: logs/worker.log),
# reports/ for the example pipeline's output, /var/lib/conveyor for a SQLite database.
RUN mkdir -p logs reports /var/lib/conveyor \
    && chown conveyor:conveyor logs reports /var/lib/conveyor

USER conveyor
ENV CONVEYOR_CONFIG=config/production.yaml

# Exec form: the worker is PID 1 and receives docker's SIGTERM itself (a shell form would
# give it to /bin/sh, and the worker would be SIGKILLed mid-task after the grace period).
# It drains for worker.max_shutdown_wait; compose's stop_grace_period must be longer.
STOPSIGNAL SIGTERM
CMD ["conveyor", "worker"]
