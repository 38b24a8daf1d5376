"""Foundations every step stands on: configuration, errors, storage (Delta tables and the files beside them),
the Spark session, and the named pause points tests use to kill a step at a chosen moment."""
