"""Fine-tune BERT on IMDb sentiment with a plain-PyTorch loop you can read top to bottom."""

__version__ = "0.1.0"
