"""The Hub: engine registration, heartbeats, the task store and the query service."""
