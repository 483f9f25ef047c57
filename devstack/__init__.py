"""The local stack for the demo, the tests and the benchmarks: dev tooling, not the product.

It may import the product (emg, workers, flows, slurm_adapter); the product never imports it
(.importlinter). devstack.processes supervises processes and waits on conditions,
devstack.services starts Redis, PostgreSQL databases and a Prefect server, devstack.stack the
application processes on them, devstack.ena_fake serves recorded ENA answers, and
devstack.demo is `make demo`.
"""
