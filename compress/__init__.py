"""compress: make trained PyTorch CNNs smaller and faster, and prove it with numbers.

Public API (see README and docs/architecture.md)::

    import compress
    model = compress.load_model("lenet5.pt")
    train, val = compress.data.split(compress.data.load("mnist5k"), 0.1)
    compress.prune_(model, compress.ThresholdConfig(sparsity=0.92), train, val)
    compress.quantize_(model, compress.QuantConfig(bits=4, scheme="kmeans"), train)
    compress.save_model(model, "lenet5.cpz")

Every verb takes a config of its own kind and changes the model in place; ``compress.run`` does
the same and returns a ``StageResult`` with the numbers.
"""
from . import data
from .coding import load_cpz, save_cpz
from .config import Config, FineTune, Select
from .errors import CompressError, FormatError, InputError, UntrustedPickleError, UsageError
from .factorize import FactorizeConfig, factorize
from .formats import load_model, save_model
from .metrics import count_macs, count_nonzero, count_params, summarize
from .models import create_model, list_models
from .pipeline import pipeline
from .prune import ChannelUnionConfig, L1FilterConfig, ThresholdConfig
from .quantize import QuantConfig
from .recipe import Recipe, Stage
from .stages import Context, StageResult, factorize_, prune_, quantize_, run
from .train import TrainConfig, evaluate, fit

__version__ = "0.2.0"

__all__ = [
    "ChannelUnionConfig", "CompressError", "Config", "Context", "FactorizeConfig", "FineTune", "FormatError",
    "InputError", "L1FilterConfig", "QuantConfig", "Recipe", "Select", "Stage", "StageResult", "ThresholdConfig",
    "TrainConfig", "UntrustedPickleError", "UsageError", "count_macs", "count_nonzero", "count_params",
    "create_model", "data", "evaluate", "factorize", "factorize_", "fit", "list_models", "load_cpz", "load_model",
    "pipeline", "prune_", "quantize_", "run", "save_cpz", "save_model", "summarize",
]
