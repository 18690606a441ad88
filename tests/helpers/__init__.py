"""Models and data shared by tests and benchmarks (see :mod:`helpers.zoo`)."""
