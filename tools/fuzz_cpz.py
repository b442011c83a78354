"""Coverage-guided fuzzing of the .cpz reader with atheris (not a dependency: `pip install atheris`).

    python tools/fuzz_cpz.py -max_total_time=300            # from the repository root
    python tools/fuzz_cpz.py corpus/ -max_total_time=300    # keep and grow a corpus folder

Seeds are real .cpz files of small models. Every input must end in a model or a FormatError, within
the decode budget; anything else (another exception, a hang, a crash) is a finding.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from compress.cpz.container import decode_model
    from compress.errors import FormatError


def seeds() -> list[bytes]:
    import torch

    from compress.config import FineTune
    from compress.cpz.container import encode_model
    from compress.models import create_model
    from compress.prune import ThresholdConfig, prune_
    from compress.quantize import QuantConfig, quantize_

    out = []
    for scheme, sparsity in (("kmeans", 0.9), ("minmax", None), ("mmse", 0.5)):
        torch.manual_seed(0)
        m = create_model("lenet300", input_size=4, num_classes=3)
        if sparsity:
            prune_(m, ThresholdConfig(sparsity=sparsity, rounds=1, finetune=FineTune(epochs=0)))
        quantize_(m, QuantConfig(bits=4, scheme=scheme))
        out.append(encode_model(m)[0])
    return out


def test_one_input(data: bytes) -> None:
    try:
        decode_model(data)
    except FormatError:
        pass


if __name__ == "__main__":
    import os
    import tempfile

    args = list(sys.argv)
    if not any(os.path.isdir(a) for a in args[1:]):  # no corpus given: start from real files
        corpus = tempfile.mkdtemp(prefix="cpz-corpus-")
        for i, s in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed{i}.cpz"), "wb") as f:
                f.write(s)
        args.append(corpus)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
