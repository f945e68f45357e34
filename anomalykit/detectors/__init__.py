"""Anomaly detectors: one file per detector, registered by name."""
