"""Benchmarks of the e2pa kernels (issue #7): time, bandwidth, memory, gated on correctness.

``python -m benchmarks`` runs the quick suite on the default device (CUDA if present, else CPU);
``--full`` the sweep. Results go to ``benchmarks/results/<device-tag>/`` as JSON, Markdown and plots.
Cases are declared in ``benchmarks/cases/`` (see :mod:`benchmarks.registry`).
"""
