"""The command line: one module per command or command group; the only package that imports click. Imports
anything in the runtime; imports selftest only on demand (doctor).
"""
