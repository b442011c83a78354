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

# the public names, by the module that defines each: imported on first use (PEP 562), so that `compress --version`
# and `--help` start without importing torch. `__all__` is these names and the `data` package.
_EXPORTS = {
    "config": ("Config", "FineTune", "Select"),
    "errors": ("CompressError", "CompressWarning", "FormatError", "InputError", "UntrustedPickleError", "UsageError"),
    "method": ("Context", "Method", "StageResult", "factorize_", "prune_", "quantize_", "run"),
    "prune": (
        "ChannelUnionConfig",
        "ChannelUnionPruner",
        "L1FilterConfig",
        "L1FilterPruner",
        "ThresholdConfig",
        "ThresholdPruner",
    ),
    "quantize": ("QuantConfig", "Quantizer"),
    "quantize.int8_stage": ("Int8Config", "Int8Lowering", "lower_int8"),
    "factorize": ("FactorizeConfig",),
    "recipe": ("Recipe", "Stage"),
    "search": ("pipeline",),
    "search_results": ("PipelineSummary",),
    "model_io": ("load_model", "save_model"),
    "cpz": ("load_cpz", "save_cpz"),
    "models": ("create_model", "list_models"),
    "counting": ("count_macs", "count_nonzero", "count_params"),
    "measure": ("summarize",),
    "scoring": ("evaluate",),
    "train": ("fit",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.3.0"
__all__ = sorted([*_MODULE_OF, "data"])


def __getattr__(name: str):
    if name == "data":
        return importlib.import_module(".data", __name__)
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    if name == "Config":  # it reads configs by their type's name: every built-in one is registered first
        importlib.import_module(".all_methods", __name__)
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
