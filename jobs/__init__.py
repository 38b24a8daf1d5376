"""The pipeline around the model, in layers (imports point down): cli -> flows -> tools -> steps -> core.

core/: configuration, errors, storage, the Spark session, registry, ledger; steps/: one module per step;
flows/: steps in order (the day, retrain, repair, demo); tools/: generator, loaders, serving, maintenance,
the Airflow launcher, the quality benchmark.
"""
