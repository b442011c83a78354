"""What a pipeline run returns (``compress.pipeline``): the summary, each stage's search and each candidate, typed.

``PipelineSummary.to_dict`` is the JSON the report (``report.json``) and ``compress pipeline --json`` hold.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Candidate:
    """One candidate of a stage's search, as it was judged.

    Args:
        value: its value of the stage's search key; options: its whole config (``Config.to_dict``).
        accuracy: its validation score; drop: the input's less its own, in points; se: the standard error of drop.
        within_budget: drop plus the margin was within the budget; verdict: why it was kept or not, in words.
        bytes: its own .cpz, as measured when it was tried.
    """

    value: Any
    options: dict[str, Any]
    accuracy: float
    drop: float
    se: float
    within_budget: bool
    verdict: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class StageSearch:
    """What one stage of the recipe tried and kept.

    Args:
        stage: the stage's method; search_key: the option its candidates differ in.
        kept: the candidate kept (None: none within budget, or stopped first); tried: every candidate decided.
        bytes, accuracy: the model after the stage (the input's, when nothing was kept yet); seconds: its time.
    """

    stage: str
    search_key: str
    kept: Candidate | None
    tried: list[Candidate]
    bytes: int
    accuracy: float
    seconds: float

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> StageSearch:
        """From the record the search keeps (and a checkpoint holds, checked by ``checkpoint_state``)."""
        return cls(
            r["stage"],
            r["search_key"],
            None if r["kept"] is None else Candidate(**r["kept"]),
            [Candidate(**c) for c in r["tried"]],
            r["bytes"],
            r["accuracy"],
            r["seconds"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "search_key": self.search_key,
            "kept": None if self.kept is None else self.kept.to_dict(),
            "tried": [c.to_dict() for c in self.tried],
            "bytes": self.bytes,
            "accuracy": self.accuracy,
            "seconds": self.seconds,
        }


@dataclasses.dataclass
class PipelineSummary:
    """What ``pipeline`` did, in numbers: what the CLI shows and the report holds (``to_dict``: its JSON).

    Args:
        stopped: why the run ended early ("time budget", "interrupted"), None when it ran to the end.
        kept_nothing: no stage kept a candidate: the model is the input's.
        budget_pt: the accuracy budget, in the metric's points.
        confidence: standard errors of margin in the budget test.
        base_accuracy, final_accuracy: the validation score of the input and of the result.
        dense_bytes: the input's weights as FP32; cpz_bytes: the result as written; ratio: the one over the other.
        timeline: one row per model along the way (stage, bytes, accuracy, params, nonzeros, macs, latency_ms).
        layer_bytes: bytes of each layer's tensors in the result's .cpz; graph_note: why no graph was stored (None).
        stages: what each stage tried and kept.
        input_shape: the shape the model was measured and traced at.
        recipe: the recipe that ran (``Recipe.to_dict``: ``Recipe.from_dict`` runs it again).
        validation: samples, source ("given" or "held out") and the data's name.
        metric: the metric's name ("evaluate" for the user's own evaluate).
        candidate_bytes_error: the file's bytes less the last kept candidate's (None: nothing kept).
        test_accuracy_before, test_accuracy_after: on the test data (None: none given).
    """

    stopped: str | None
    kept_nothing: bool
    budget_pt: float
    confidence: float
    base_accuracy: float
    final_accuracy: float
    dense_bytes: int
    cpz_bytes: int
    ratio: float
    timeline: list[dict]
    layer_bytes: dict[str, int]
    graph_note: str | None
    stages: list[StageSearch]
    input_shape: list[int]
    recipe: dict[str, Any]
    validation: dict[str, Any]
    metric: str
    candidate_bytes_error: int | None = None
    test_accuracy_before: float | None = None
    test_accuracy_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The summary's JSON (the report's and ``--json``'s): the optional numbers only when measured."""
        optional = ("candidate_bytes_error", "test_accuracy_before", "test_accuracy_after")
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in optional or getattr(self, f.name) is not None
        }
        return {**d, "stages": [s.to_dict() for s in self.stages]}
