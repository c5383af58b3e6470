"""Files on disk: the one file-operations module, atomic writes, the container format, the codec, keys and
crypto, the writer lock, the state file, file validation, the outcome-unknown marker. Imports model and core.
"""
