"""Backups, retention, recovery and repair, working on the small StateFiles interface (never on the manager).
Imports journal, storage, model, core.
"""
