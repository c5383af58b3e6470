"""The bottom layer: errors, configuration, version, events. Every layer may import it; it imports nothing of
posstate.
"""
