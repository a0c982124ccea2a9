"""What the command line runs: each command's config and the loading it needs (``select``,
``train``, ``compare``), and the flags generated from the configs (``arguments``)."""
