"""The benchmark scripts (``python benchmarks/NAME.py``); a package so that the tests import their
helpers by name. Each one's output goes into the docs with the command and machine that produced it."""
