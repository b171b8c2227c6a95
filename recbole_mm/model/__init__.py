"""Models (one per file) and the blocks they share (``layers.py``)."""
