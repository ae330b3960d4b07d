"""dpolab: the DPO family, trainable and understandable."""

__version__ = "0.1.0"
__all__ = ["Trainer", "sweep"]


def __getattr__(name: str):
    # Imported on first use: `import dpolab` stays light (no torch, no transformers).
    if name == "Trainer":
        from dpolab.api import Trainer

        return Trainer
    if name == "sweep":  # the function; the module holding it is dpolab.sweeps
        from dpolab.sweeps import sweep

        return sweep
    raise AttributeError(f"module 'dpolab' has no attribute {name!r}")
