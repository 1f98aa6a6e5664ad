"""Measurement: the task suite, scorers, judge, and the eval / bench harness."""
