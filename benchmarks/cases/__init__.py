"""Benchmark case families, one module each; every module here is imported by
:func:`benchmarks.registry.load_cases` and registers its cases at import."""
