"""dejavu-run: the repository root is the ``dejavu`` package.

Floors, lowest first: kernels < runtime < scheduler core (core, batches, planner, engine,
client) < pipeline processes (scheduler process, launch, config, workers, transport) < front
ends (tools' CLI, chat, HTTP serve) and bench. A module imports only from its own floor or
below (tests/test_floors.py).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dejavu-run")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
