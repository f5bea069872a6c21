"""Persistent state: schema and migrations, the store, and its batched writer process."""
