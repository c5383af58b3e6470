"""Test machinery: the fault harness, crash children, replay, the reliability journal, the doctor's checks. Never
imported by the runtime; the doctor command imports it when run.
"""
