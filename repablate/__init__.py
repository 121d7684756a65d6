"""repablate: a research harness for ablations of structural re-parameterization (RepConv and friends)."""

__version__ = "0.1.0"
