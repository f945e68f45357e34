"""anomalykit: visual anomaly detection trained on good images only.

The package root stays import-light (no torch) so that ``anomalykit.export.runtime``
can run on a factory PC that has onnxruntime but no PyTorch.
"""

__version__ = "0.1.0"
