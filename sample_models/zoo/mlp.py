"""A BatchNorm1d MLP head, as self-supervised projectors and tabular nets build it.

The habits kept from MoCo v3's ``_build_mlp`` (and SimCLR/BYOL projectors): ``Linear``
without bias, then ``BatchNorm1d``, ``nn.ReLU(inplace=True)`` and ``nn.Dropout``, and a
last ``BatchNorm1d(affine=False)`` that normalizes the embedding itself.
"""

from __future__ import annotations

from torch import nn

from sample_models import example_input


def build_mlp(
    num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True, dropout: float = 0.0
) -> nn.Sequential:
    """``num_layers`` Linear layers; BN1d-ReLU(inplace)-Dropout between them; an affine-free BN1d last.

    Args:
        num_layers: Linear layers (at least 1).
        input_dim, mlp_dim, output_dim: widths of the input, hidden layers and output.
        last_bn: end with ``BatchNorm1d(output_dim, affine=False)``.
        dropout: after each hidden ReLU (0 by default, so that runs compare exactly).

    Example:
        >>> import torch
        >>> build_mlp(2, 8, 16, 4)(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*layers)


@example_input(16)
def mlp_head() -> nn.Sequential:
    """A MoCo v3-style projector on 16 features: 3 Linear layers, 3 BatchNorm1d (the last affine-free).

    Habits: ``Linear(bias=False) -> BatchNorm1d -> ReLU(inplace=True) -> Dropout(p=0)``,
    an affine-free BatchNorm1d on the output.

    Example:
        >>> import torch
        >>> mlp_head()(torch.randn(4, 16)).shape
        torch.Size([4, 8])
    """
    return build_mlp(3, 16, 32, 8)
