"""Compression inside a training loop you already run (plain, DDP or torchrun).

These are the very method objects the library's own loop drives (``compress.stages``), so your
loop and ``compress prune`` cannot drift apart::

    pruner = ThresholdPruner(model, ThresholdConfig(sparsity=0.9, rounds=3), steps_per_round=1000)
    pruner.attach()                 # round 1: masks on
    for x, y in loader:
        loss = criterion(ddp_model(x), y)
        loss.backward()
        pruner.after_backward()     # pruned weights get no gradient (so no optimizer state)
        optimizer.step()
        pruner.step(lr)             # masks hold; the next round prunes more on schedule
    model = pruner.finalize()       # exact zeros, no mask machinery

``ChannelUnionPruner`` adds PruneTrain's group lasso as a proximal step after each optimizer step and
reconfigures every ``interval`` steps (BatchNorm statistics re-estimated first, on
``Context(train=...)`` if you give it, else on the last batch it saw); ``step(lr)`` returns True
when the architecture changed: rebuild your optimizer (and re-wrap DDP) around ``pruner.model``.
``Quantizer`` with ``scheme="kmeans"`` trains shared centroids: give ``quantizer.parameters()`` to
your optimizer. ``Int8Lowering`` with ``Int8Config(finetune=FineTune(epochs=N))`` is quantization-aware
training: after ``attach()`` train ``lowering.model`` (the fake-quantized copy) with your loop, calling
``lowering.step()`` after each optimizer step (batch-norm statistics and ranges freeze on schedule), and
``finalize()`` returns the ``Int8Model`` PyTorch runs as integers. Every decision is a deterministic
function of the weights, so under DDP (whose gradients are all-reduced) every rank makes the same one;
write files from rank 0 only.
"""
from __future__ import annotations

from compress.prune.channel_union import ChannelUnionPruner
from compress.prune.threshold import ThresholdPruner
from compress.quantize import Int8Lowering, Quantizer
from compress.stages import Context, Method

__all__ = ["ChannelUnionPruner", "Context", "Int8Lowering", "Method", "Quantizer", "ThresholdPruner"]
