"""dpolab: the DPO family, trainable and understandable."""

__version__ = "0.1.0"
