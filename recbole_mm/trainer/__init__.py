from recbole_mm.trainer.checkpoint import load_checkpoint, save_checkpoint
from recbole_mm.trainer.trainer import MMTrainer

__all__ = ["MMTrainer", "load_checkpoint", "save_checkpoint"]
