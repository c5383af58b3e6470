"""The write-ahead journal: its binary format, record encoding and replay, the journal writer, audit/history, and
the read-only current view (snapshot + journal). Imports storage, model, core.
"""
