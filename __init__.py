"""dejavu-run: the repository root is the ``dejavu`` package.

Floors, lowest first: kernels < runtime < scheduler core (core, batches, planner, client,
config) < pipeline processes (scheduler process, workers, transport) < front ends (tools' CLI,
chat, HTTP serve) and bench. A module imports only from its own floor or below.
"""
