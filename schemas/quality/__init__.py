"""Data-quality suites: what good data means for each table (suites.py); `userformer check` runs them."""
