-- Run once by the postgres image on an empty data volume (compose.yaml): MLflow, Prefect and Optuna (flows.tune)
-- each get their own database (all keep an alembic_version table, so they cannot share one). POSTGRES_DB
-- creates "mlflow". A data volume made before the optuna database was added: CREATE DATABASE optuna; by hand.
CREATE DATABASE prefect;
CREATE DATABASE optuna;
