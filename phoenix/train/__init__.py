"""The training loop and its entry point (``python -m phoenix.train CONFIG``)."""
