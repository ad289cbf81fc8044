#!/usr/bin/env bash
# Runs once, when the postgres container starts on an empty data volume: one role and database
# for Airflow's metadata, one role with two databases for MLflow (tracking and model registry;
# basic-auth users). Passwords come from docker/.env through the compose file.
set -euo pipefail
: "${AIRFLOW_DB_PASSWORD:?}" "${MLFLOW_DB_PASSWORD:?}"
psql --set ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set airflow_password="$AIRFLOW_DB_PASSWORD" \
    --set mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
SQL
