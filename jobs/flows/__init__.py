"""Flows: steps run in order. The day (pipeline: the step list and the day ledger), retrain, repair, demo."""
