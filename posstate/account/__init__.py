"""The account store: types, update feed, persistence through a manager, reconciliation, the reconcile file.
Imports manager and below.
"""
