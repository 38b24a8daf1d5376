"""Storage: Delta tables (delta-rs and delta-spark) and the files kept beside them, local or in a bucket."""
