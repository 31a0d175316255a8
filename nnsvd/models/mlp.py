"""The MNIST MLP of the original work: 784 → hidden → hidden → 10 with ReLU."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """l1: in→h, l2: h→h, l3: h→classes; dropout after each hidden ReLU, active in training only.

    (The original applied dropout at evaluation too, which cost it 5–7 accuracy points.)
    """

    def __init__(self, in_features: int = 784, hidden: int = 64, num_classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.l1 = nn.Linear(in_features, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(torch.relu(self.l1(x.flatten(1))))
        x = self.dropout(torch.relu(self.l2(x)))
        return self.l3(x)

    def linear_layers(self) -> list[nn.Module]:
        """The layers in order, for the Lipschitz output-error bound (ReLU between them)."""
        return [self.l1, self.l2, self.l3]
