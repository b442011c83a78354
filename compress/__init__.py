"""compress: make trained PyTorch CNNs smaller and faster, and prove it with numbers.

Public API (see README for a tour)::

    import compress
    model = compress.load_model("lenet5.pt")
    data = compress.data.load("mnist5k")
    compress.prune.threshold(model, sparsity=0.9, train_data=data)
"""
from . import data
from .errors import CompressError, FormatError, InputError, UntrustedPickleError, UsageError
from .io import load_model, save_model
from .metrics import count_macs, count_nonzero, count_params, summarize
from .models import create_model, list_models
from .train import TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "CompressError", "FormatError", "InputError", "TrainConfig", "UntrustedPickleError", "UsageError",
    "count_macs", "count_nonzero", "count_params", "create_model", "data", "evaluate", "fit",
    "list_models", "load_model", "save_model", "summarize",
]
