"""Training speed: throughput and memory against the baselines (throughput.py), a per-part profile of
one step (profile_step.py), and the report tables (report.py)."""
