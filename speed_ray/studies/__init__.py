"""Studies: scaling-law sweep, synthetic-data influence, cost report, run report."""
