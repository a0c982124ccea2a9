"""Dependency-light evaluation core: GLUE-style metrics, math answer extraction, and a code sandbox.

Submodules (pure Python + numpy; import them directly, nothing heavy is imported here):

* :mod:`lwlora.evaluation.metrics` -- accuracy, F1, Matthews correlation, Pearson, Spearman,
  ``GLUE_METRICS`` and :func:`~lwlora.evaluation.metrics.compute_metrics`.
* :mod:`lwlora.evaluation.answers` -- GSM8K / MATH answer extraction and numeric matching,
  multiple-choice letter extraction.
* :mod:`lwlora.evaluation.sandbox` -- run generated Python code against HumanEval-style tests as an
  unprivileged user in its own namespaces, with a verdict the program cannot forge (docs/sandbox.md).
"""
