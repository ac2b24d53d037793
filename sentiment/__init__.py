"""Fine-tune BERT on IMDb sentiment with a plain-PyTorch loop you can read top to bottom.

The Python API is the command line's: the same Config, the same runs, the same files.

    import logging
    from sentiment import Config, train, evaluate, predict

    results = train(Config(model_name_or_path=MINILM, data_dir="runs/imdb_split", val_fraction=0.1,
                           epochs=1, max_length=256, output_dir="runs/notebook"))
    print(results["accuracy"], results["model_dir"])  # what results.json holds, and where the model is
    trained = Config(model_name_or_path="runs/notebook", data_dir="runs/imdb_split")  # a run folder works
    print(evaluate(trained)["f1"])  # the metrics of `sentiment evaluate`
    print(predict(trained, ["A wonderful film.", "Two hours I will not get back."]))  # label, prob_NAME per class
    logging.getLogger("sentiment").setLevel(logging.WARNING)  # quiet: the run's lines go through logging

`sentiment.train`, `sentiment.evaluate` and `sentiment.predict` are these functions; the modules of the same
names stay importable (`from sentiment.train import run`).
"""

__version__ = "0.1.0"

from sentiment.commands import evaluate_model as evaluate  # noqa: E402
from sentiment.commands import predict  # noqa: E402
from sentiment.config import Config  # noqa: E402
from sentiment.train import train  # noqa: E402

__all__ = ["Config", "train", "evaluate", "predict"]
