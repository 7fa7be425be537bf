"""BatchNorm folding: same outputs, BN gone, only conv-fed BNs folded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.algorithms.quant.fold import fold_batchnorm


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.bn_after_relu = nn.BatchNorm2d(8)  # fed by a ReLU: stays
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.bn1(self.dw(self.bn0(self.stem(x)))))
        return self.head(self.bn_after_relu(x).mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = _Net()
    for bn in (net.bn0, net.bn1, net.bn_after_relu):  # non-trivial statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(-2, 2)
        bn.bias.data.uniform_(-1, 1)
    return net.eval()


def test_folding_keeps_outputs_and_removes_conv_fed_bns():
    net = _net()
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        ref = net(x)
    pairs = fold_batchnorm(net, x[:1])
    assert pairs == [("stem", "bn0"), ("dw", "bn1")]
    assert isinstance(net.bn0, nn.Identity) and isinstance(net.bn1, nn.Identity)
    assert isinstance(net.bn_after_relu, nn.BatchNorm2d)
    assert net.stem.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(_net().train(), torch.randn(1, 3, 10, 10))
