"""The steps: each writes one thing (a table, a model version, an index version, a report) for one drop date,
runs from the CLI and from an Airflow task, and uses only jobs.core."""
