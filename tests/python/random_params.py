"""Named parameters with random values and gradients, for the Python tests (not a test itself:
CTest runs tests/python/test_*.py)."""

import torch


def params(**shapes):
    """[(name, torch.nn.Parameter)] with N(0, 1) values and gradients of the given shapes."""
    out = []
    for name, shape in shapes.items():
        p = torch.nn.Parameter(torch.randn(shape))
        p.grad = torch.randn(shape)
        out.append((name, p))
    return out
