"""``python -m anomalykit ...``: the same command line as the ``anomalykit`` script."""

from __future__ import annotations

from anomalykit.cli import main

if __name__ == "__main__":
    main()
