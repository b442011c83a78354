"""compress: make trained PyTorch CNNs smaller and faster, and prove it with numbers.

Public API (see README for a tour)::

    import compress
    model = compress.load_model("lenet5.pt")
    train, val = compress.data.split(compress.data.load("mnist5k"), 0.1)
    compress.prune_(model, compress.ThresholdConfig(sparsity=0.92), train, val)
    compress.quantize_(model, compress.QuantConfig(bits=4, scheme="kmeans"), train)
    compress.save_cpz(model, "lenet5.cpz")
"""
from . import data
from .coding import load_cpz, save_cpz
from .config import Config
from .errors import CompressError, FormatError, InputError, UntrustedPickleError, UsageError
from .factorize import FactorizeConfig, factorize
from .io import load_model, save_model
from .metrics import count_macs, count_nonzero, count_params, summarize
from .models import create_model, list_models
from .pipeline import pipeline
from .prune import ChannelUnionConfig, L1FilterConfig, ThresholdConfig, prune_
from .quantize import QuantConfig, quantize_
from .train import TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "ChannelUnionConfig", "CompressError", "Config", "FactorizeConfig", "FormatError", "InputError",
    "L1FilterConfig", "QuantConfig", "ThresholdConfig", "TrainConfig", "UntrustedPickleError", "UsageError",
    "count_macs", "count_nonzero", "count_params", "create_model", "data", "evaluate", "factorize", "fit",
    "list_models", "load_cpz", "load_model", "pipeline", "prune_", "quantize_", "save_cpz", "save_model",
    "summarize",
]
