"""The trainer, checkpoints, evaluation (imports methods/, models/, data/; never imported by them)."""
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import accuracy, linear_probe_accuracy, linear_probe_scores, macro_f1
from .trainer import Trainer, batches, build_model, build_optimizer, evaluate, linear_probes, linear_probes_by_split

__all__ = ["Trainer", "batches", "build_model", "build_optimizer", "evaluate", "linear_probes", "linear_probes_by_split", "linear_probe_scores",
           "load_checkpoint", "save_checkpoint", "accuracy", "macro_f1", "linear_probe_accuracy"]
