"""compress: make trained PyTorch CNNs smaller and faster, and prove it with numbers.

Public API (see README and docs/architecture.md)::

    import compress
    model = compress.load_model("lenet5.pt")
    train, val = compress.data.split(compress.data.load("mnist5k"), 0.1)
    compress.prune_(model, compress.ThresholdConfig(sparsity=0.92), train, val)
    compress.quantize_(model, compress.QuantConfig(bits=4, scheme="kmeans"), train)
    compress.save_model(model, "lenet5.cpz")

Every verb ending in ``_`` takes a config of its own kind and changes the model in place;
``compress.lower_int8(model, Int8Config(), calib_data=...)`` makes a new ``Int8Model`` that runs as integers;
``compress.run`` does either and returns a ``StageResult`` with the numbers.
"""
import importlib

# name -> the module that defines it: imported on first use (PEP 562), so that `compress --version`
# and `--help` start without importing torch
_EXPORTS = {
    "load_cpz": "cpz", "save_cpz": "cpz", "Config": "config", "FineTune": "config", "Select": "config",
    "CompressError": "errors", "CompressWarning": "errors", "FormatError": "errors", "InputError": "errors", "UntrustedPickleError": "errors",
    "UsageError": "errors", "FactorizeConfig": "factorize", "load_model": "model_io", "save_model": "model_io",
    "count_macs": "counting", "count_nonzero": "counting", "count_params": "counting", "summarize": "measure",
    "create_model": "models", "list_models": "models", "pipeline": "search", "ChannelUnionConfig": "prune",
    "L1FilterConfig": "prune", "ThresholdConfig": "prune", "QuantConfig": "quantize", "Int8Config": "quantize.int8_stage", "Recipe": "recipe",
    "Stage": "recipe", "Context": "method", "StageResult": "method", "factorize_": "method", "prune_": "method",
    "quantize_": "method", "run": "method", "Method": "method", "ThresholdPruner": "prune", "L1FilterPruner": "prune",
    "ChannelUnionPruner": "prune", "Quantizer": "quantize", "Int8Lowering": "quantize.int8_stage", "lower_int8": "quantize.int8_stage", "TrainConfig": "train", "evaluate": "scoring", "fit": "train",
}


def __getattr__(name: str):
    if name == "data":
        return importlib.import_module(".data", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


__version__ = "0.3.0"

__all__ = [
    "ChannelUnionConfig", "ChannelUnionPruner", "CompressError", "CompressWarning", "Config", "Context", "FactorizeConfig", "FineTune", "FormatError",
    "InputError", "Int8Config", "Int8Lowering", "L1FilterConfig", "L1FilterPruner", "Method", "QuantConfig", "Quantizer", "Recipe", "Select", "Stage", "StageResult", "ThresholdConfig", "ThresholdPruner",
    "UntrustedPickleError", "UsageError", "count_macs", "count_nonzero", "count_params",
    "create_model", "data", "evaluate", "factorize_", "fit", "list_models", "load_cpz", "load_model", "lower_int8",
    "pipeline", "prune_", "quantize_", "run", "save_cpz", "save_model", "summarize",
]
