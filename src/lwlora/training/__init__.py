"""Fine-tuning with adapters on the selected blocks (``lwlora train``)."""
