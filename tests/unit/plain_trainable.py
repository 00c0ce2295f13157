"""The engine's Trainable contract with nothing but a ``student``: what a test trainable (no distiller) adds is
its ``metric_names``, its network and its ``forward``."""

from __future__ import annotations

from torch import nn


class PlainTrainable(nn.Module):
    """Every parameter of ``self.student`` in one group; the whole module is the checkpointed state."""

    student: nn.Module

    def param_groups(self, base_lr):
        return [{"params": list(self.student.parameters()), "lr": base_lr}]

    def compile_networks(self):
        self.student.compile()

    def training_state(self):
        return self.state_dict()

    def load_training_state(self, state):
        self.load_state_dict(state)

    def end_epoch(self, progress, row):
        pass
