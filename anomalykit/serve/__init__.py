"""Torch-free serving of exported anomalykit models on a line PC.

- :mod:`anomalykit.serve.app`: the HTTP inspection service (FastAPI on uvicorn) and its page;
  ``create_app(model, settings)``, ``run(...)``, ``main(argv)``.
- :mod:`anomalykit.serve.batching`: micro-batching of concurrent requests.
- :mod:`anomalykit.serve.limits`: :class:`ServiceSettings` and the header-only image-size check.
- :mod:`anomalykit.serve.watcher`: the folder watcher.

This file imports nothing: the watcher must work without the web stack, and nothing here
may import torch (only :mod:`anomalykit.export.runtime` from anomalykit).
"""
