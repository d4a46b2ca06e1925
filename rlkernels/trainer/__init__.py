"""The reference GRPO trainer (optional: needs the ``train`` extra, ``pip install rlkernels[train]``).

    rlkernels-train --preset dapo --max-steps 200 --out runs/demo
"""
from .loop import GRPOTrainer, Rollouts, TrainerConfig, plot_history
from .tasks import TASKS, CharTokenizer, Task

__all__ = ["GRPOTrainer", "TrainerConfig", "Rollouts", "plot_history", "TASKS", "Task", "CharTokenizer"]
