"""Metrics and logs: every Prometheus instrument is declared in metrics.py, nowhere else."""
