"""The HTTP inspection service for an exported anomalykit model: a thin entry point.

    python deploy/service.py model.onnx --host 127.0.0.1 --port 8080 [--max-batch 8] ...

The service itself is :mod:`anomalykit.serve.app` (FastAPI on uvicorn; routes, limits and
options in its docstring and in ``deploy/README.md``); ``anomalykit serve`` runs the same.
No torch: it needs the packages of ``deploy/requirements.txt`` and the torch-free part of
anomalykit (installed with ``pip install --no-deps``, or the folders the Dockerfile copies).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from anomalykit.serve.app import main
except ImportError as exc:
    if getattr(exc, "name", "") not in ("anomalykit", "anomalykit.serve", "anomalykit.serve.app"):
        raise  # a missing dependency (fastapi...), not a missing package: say so
    # Run from a checkout without installing: the package sits one folder up.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from anomalykit.serve.app import main

if __name__ == "__main__":
    sys.exit(main())
