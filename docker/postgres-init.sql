-- Run once by the postgres image on an empty data directory
-- (mounted into /docker-entrypoint-initdb.d by compose.yaml).
CREATE DATABASE emg;      -- Django (DATABASE_URL)
CREATE DATABASE prefect;  -- the Prefect server (PREFECT_SERVER_DATABASE_CONNECTION_URL)
