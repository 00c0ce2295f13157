"""gkd_core: knowledge distillation with a Gompertz-curve distillation weight, as a pure PyTorch library.

No Prefect, MLflow or DVC imports here: this package runs on a GPU box that has only torch (+POT).
"""

__version__ = "0.1.0"
