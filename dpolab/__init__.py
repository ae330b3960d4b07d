"""dpolab: the DPO family, trainable and understandable."""

__version__ = "0.1.0"
__all__ = ["Trainer"]


def __getattr__(name: str):
    # Imported on first use: `import dpolab` stays light (no torch, no transformers).
    if name == "Trainer":
        from dpolab.api import Trainer

        return Trainer
    raise AttributeError(f"module 'dpolab' has no attribute {name!r}")
