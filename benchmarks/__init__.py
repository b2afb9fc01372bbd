"""Performance benchmarks of layerlab (issue 6): run them with ``python -m benchmarks.run [--quick]``."""
