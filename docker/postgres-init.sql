-- Run once by the postgres image on an empty data volume (compose.yaml): MLflow and Prefect each get their
-- own database (both keep an alembic_version table, so they cannot share one). POSTGRES_DB creates "mlflow".
CREATE DATABASE prefect;
