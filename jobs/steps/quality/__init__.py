"""The quality gates: what good data means for each table (suites.py) and for the staged outputs (outputs.py);
`userformer check` (jobs/steps/check.py) runs them."""
