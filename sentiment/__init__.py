"""Fine-tune BERT on IMDb sentiment with a plain-PyTorch loop you can read top to bottom.

    from sentiment import Config, train, evaluate, predict

    results = train(Config(model_name_or_path="path/to/minilm", data_dir="imdb", output_dir="runs/nb"))
    predict(Config(model_name_or_path=results["model_dir"]), ["A wonderful film."])

`sentiment.train`, `sentiment.evaluate` and `sentiment.predict` are these functions; the modules of the
same names stay importable with `from sentiment.train import run` and the like.
"""

__version__ = "0.1.0"

from sentiment.commands import evaluate_saved as evaluate  # noqa: E402
from sentiment.commands import predict  # noqa: E402
from sentiment.config import Config  # noqa: E402
from sentiment.train import train  # noqa: E402

__all__ = ["Config", "train", "evaluate", "predict"]
