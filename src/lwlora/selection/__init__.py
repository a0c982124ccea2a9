"""Choosing the blocks: options → capture → score → policy → artifact (``selection.json``).

``options`` (what may be chosen, validated), ``capture`` (hooks, pooling, streamed statistics),
``scoring`` (similarity scorers) and ``gradients`` (gradient probes), ``units`` (sub-layer units),
``policy`` (rules and budgets), ``cost`` (adapter parameters, training cost), ``stability``
(bootstrap), ``artifact`` (``LayerSelection``), ``pipeline`` (the whole, on a loaded model) and
``report`` (table, CSV, plot). Nothing here loads a model or imports training code.
"""
