"""Arrow schemas of raw inputs and every table (tables.py); data-quality suites (quality/)."""
