"""Positions and the state document in memory: the position record, the document codec (JSON), its schema and
fast validation, merging, and the journal's operations on a document. Imports core only.
"""
