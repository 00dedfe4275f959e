# Stand-in for ghcr.io/mlflow/mlflow:v3.17.0-full where no registry can be reached: Debian's Python
# with the same MLflow release, its basic-auth app (the auth extra) and the PostgreSQL drivers (SQLAlchemy 2 picks psycopg 3 for
# postgresql://, older releases psycopg2: both are installed).
FROM localhost/debian:bookworm
ARG MLFLOW=3.17.0
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/mlflow
ENV PATH=/opt/mlflow/bin:$PATH
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW}" "psycopg[binary]" psycopg2-binary \
    && mlflow --version
