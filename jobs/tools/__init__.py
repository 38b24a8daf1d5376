"""Tools around the pipeline: the data generator and public-data loaders, serving, info, maintenance, the Airflow
launcher and the quality benchmark."""
