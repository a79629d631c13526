"""The trainer, checkpoints, evaluation (imports methods/, models/, data/; never imported by them)."""
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import accuracy, linear_probe_accuracy, macro_f1
from .trainer import Trainer, batches, build_model, build_optimizer, evaluate, linear_probes

__all__ = ["Trainer", "batches", "build_model", "build_optimizer", "evaluate", "linear_probes",
           "load_checkpoint", "save_checkpoint", "accuracy", "macro_f1", "linear_probe_accuracy"]
