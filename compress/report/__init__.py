"""Reports: the numbers of one model file (``model_report``), and rendered reports of a run."""

from compress.report.summary import model_report

__all__ = ["model_report"]
