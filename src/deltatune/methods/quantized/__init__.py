"""Deltas trained for, or on, quantised weights: ``loftq``, ``l4q``."""
