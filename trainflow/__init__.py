"""trainflow: one YAML config in, a tuned, trained, evaluated, compressed and published PyTorch model out.

The installed package maps the checkout's top-level folders under this one name (pyproject.toml's
`package-dir`): `trainflow.core` is `core/` (the library), `trainflow.tasks` is `tasks/` (one Prefect task
per stage), `trainflow.flows` is `flows/` (the flows and the `trainflow` command) and
`trainflow.deployments` is `deployments/` (schedules, events, the UIs). Importing this package imports
nothing else.
"""
