"""ptlab: a parameter-transfer lab reproducing "Towards Understanding Feature Learning in Parameter Transfer"."""

__version__ = "0.1.0"
