"""The benchmark scripts, run from the repository root as ``python -m benchmarks.NAME``; a package so that
they share one module of published configs (``configs``) and one meter (``meter``), and so that the
tests import their helpers by name. Each one's output goes into the docs with the command and machine
that produced it."""
