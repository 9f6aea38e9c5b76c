# tinyllm-trio in a container. Not built by the tests (no registry here); `hadolint Dockerfile`
# runs in tests/test_deploy_kubernetes.py. Build and run:
#
#   docker build -t tinyllm-trio:0.1.0 .
#   docker run --rm -p 8080:8080 --shm-size 16m tinyllm-trio:0.1.0
#
# The packaged model ships inside the wheel, so the image serves with no volume. Kubernetes:
# deploy/kubernetes/ (read-only root filesystem, /dev/shm and the numba cache as emptyDirs).
FROM python:3.11-slim

# No .pyc writes at run time (the root filesystem may be read-only), logs unbuffered, pip
# without its cache. numba caches its compiled kernels in NUMBA_CACHE_DIR, writable by the
# user below; Kubernetes mounts an emptyDir there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/var/cache/numba

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install . \
    && groupadd --system --gid 10001 tinyllm \
    && useradd --system --uid 10001 --gid tinyllm --no-create-home --home-dir /nonexistent tinyllm \
    && mkdir -p /var/cache/numba \
    && chown tinyllm:tinyllm /var/cache/numba

WORKDIR /
USER 10001:10001
EXPOSE 8080

# The server drains on SIGTERM (docker stop, Kubernetes): listener closed, in-flight streams
# finished within --shutdown-grace (10 s by default; give `docker stop -t` more than that).
# The exec form keeps tinyllm-trio as PID 1, so the signal reaches it and not a shell.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
CMD ["tinyllm-trio", "serve", "--host", "0.0.0.0"]
