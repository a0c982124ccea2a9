"""Putting adapters where a selection says: PEFT configs and ``verify`` (``placement``), rank
plans (``ranks``), exports to other trainers (``export``) and the adapter's model card (``card``)."""
