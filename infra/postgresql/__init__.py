"""Django's PostgreSQL backend with one more rule: a batch left in flight on a connection
(``infra.sql.Batch.send``) is read before the connection is used for anything else."""
