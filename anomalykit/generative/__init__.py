"""The generative suite: one file per family; detectors import from here."""
