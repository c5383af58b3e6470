"""PositionStateManager, split by concern (in-memory changes, durable commit path, loading, lifecycle), periodic
validation, order intents. Imports backup and below.
"""
