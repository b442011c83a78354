"""A model's computation as compress's own graph data: captured with ``torch.export``, checked, and run by compress's
own interpreter of a fixed table of ATen operators."""
