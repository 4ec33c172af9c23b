"""Checkpoint reading and model writing."""
