"""BatchNorm1d models: an MLP on (N, C) features and a temporal conv net on (N, C, L)."""

from __future__ import annotations

from torch import nn

from sample_models import example_input


@example_input(32)
def mlp_bn1d() -> nn.Module:
    """Linear-BN1d-ReLU twice, then a classifier; input ``(N, 32)``.

    Example:
        >>> import torch
        >>> mlp_bn1d()(torch.randn(4, 32)).shape
        torch.Size([4, 10])
    """
    return nn.Sequential(
        nn.Linear(32, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@example_input(8, 24)
def temporal_bn1d() -> nn.Module:
    """Conv1d-BN1d-ReLU on sequences; input ``(N, 8, 24)``.

    Example:
        >>> import torch
        >>> temporal_bn1d()(torch.randn(2, 8, 24)).shape
        torch.Size([2, 16, 24])
    """
    return nn.Sequential(
        nn.Conv1d(8, 16, 3, padding=1),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, padding=1),
        nn.BatchNorm1d(16),
    )
