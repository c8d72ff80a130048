"""Training and using a model: ``train(TrainConfig(...))``, ``evaluate``, ``load_model``, ``predict_array``.

    config.py    TrainConfig, the options of a run, and their validation
    build.py     the task, model, loader, optimizer and schedule built from it
    state.py     TrainState: where the loop stands, saved and loaded whole
    loop.py      train(): forward, loss, backward, step; evaluate; save
    evaluate.py  scores on a split, the prediction of one image
    run.py       the run folder: checkpoints, resume, metrics.json, pictures
    faults.py    NaN loss, Ctrl-C
    progress.py  what the user sees
"""

from .config import TrainConfig, parse_resize
from .evaluate import evaluate, predict_array
from .faults import NonFiniteLossError, TrainingInterrupted
from .loop import train
from .run import load_model, resolve_checkpoint
from .state import TrainState

__all__ = ["TrainConfig", "TrainState", "train", "evaluate", "load_model", "predict_array", "NonFiniteLossError",
           "TrainingInterrupted", "resolve_checkpoint", "parse_resize"]
