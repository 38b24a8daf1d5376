"""The pipeline's steps as plain functions, each also a `userformer` subcommand.

One module per step: generate, ingest, sequences, check; loaders/ for real
public formats; storage/ for Delta tables (delta-rs) and the Spark bridge.
"""
