"""The model zoo: plain-torch definitions created through a registry."""

from compress.models import blocks, lenet, resnet, small  # noqa: F401  (registers the models)
from compress.models._registry import create_model, list_models, model_doc, register_model

__all__ = ["create_model", "list_models", "model_doc", "register_model"]
