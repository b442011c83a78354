"""The README's library tour runs: every python block of its "## The library" section, as written and in
order, in a fresh folder (as tools/readme_check.py runs the command-line tour).

Only the sizes below change, each a literal text of the README that must be there (so that a changed README
fails here rather than silently running something else): less data, fewer epochs, and a pipeline recipe of one
candidate. The calls, their arguments and the files they write are the README's.
"""

import re
from pathlib import Path

import compress

README = Path(__file__).resolve().parents[1] / "README.md"

# README text -> what runs here instead: the data and the work made small, nothing else. The data: 100 of the
# 8x8 digits scikit-learn ships, padded to LeNet-5's 28x28 (mnist5k is parsed from a 5,000-line CSV at each load)
FAST = {
    '"mnist5k"': '"digits?size=28&limit=100"',
    "FineTune(epochs=6)": "FineTune(epochs=1)",
    "ThresholdConfig(sparsity=0.92,": "ThresholdConfig(sparsity=0.92, rounds=1,",
    "ThresholdConfig(sparsity=0.8,": "ThresholdConfig(sparsity=0.8, rounds=1,",
    "digits.x[:4000], digits.y[:4000]": "digits.x[:80], digits.y[:80]",
    "digits.x[4000:], digits.y[4000:]": "digits.x[80:], digits.y[80:]",
    "max_accuracy_drop=0.5)": "max_accuracy_drop=0.5, recipe=ONE_CANDIDATE, latency=False)",
}
# the pipeline's default recipe searches six sparsities of 3 rounds and 12 epochs each, then five codebooks
ONE_CANDIDATE = {
    "version": 2,
    "stage": [
        {"method": "threshold", "sparsity": [0.9], "rounds": 1, "finetune": {"epochs": 1}},
        {"method": "quantize", "scheme": "kmeans", "bits": [{"conv": 8, "linear": 5}], "finetune": {"epochs": 0}},
    ],
}


def library_blocks(text: str) -> list[str]:
    """The python blocks between '## The library' and the next section of the same level."""
    start = text.index("## The library\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], re.S)


def fast(block: str) -> str:
    for old, new in FAST.items():
        block = block.replace(old, new)
    return block


def test_every_substitution_matches_the_readme():
    text = "".join(library_blocks(README.read_text()))
    missing = [old for old in FAST if old not in text]
    assert not missing, f"the README's library tour changed; update FAST for: {missing}"


def test_the_readme_library_tour_runs(tmp_path, monkeypatch, capsys):
    blocks = library_blocks(README.read_text())
    assert len(blocks) >= 2 and all("compress" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    # the file the command-line tour trains first (`compress zoo train lenet5 ... -o lenet5.pt`), untrained here
    compress.save_model(compress.create_model("lenet5"), "lenet5.pt")
    for i, block in enumerate(blocks):
        code = compile(fast(block), f"README.md, library block {i + 1}", "exec")
        exec(code, {"__name__": "__readme__", "ONE_CANDIDATE": ONE_CANDIDATE})
    shown = capsys.readouterr().out
    assert "%" in shown and "top-5" in shown
    assert compress.load_model("lenet5-api.cpz") is not None and (tmp_path / "lenet5-int8.pt").is_file()
