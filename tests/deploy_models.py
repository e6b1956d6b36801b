"""A small model with MissLinear layers in all three modes, shared by the deployment tests
(export, AOTInductor). Random non-zero blocks, so every adapter path changes the output."""
import torch
from torch import Tensor, nn

from miss_ext import MissLinear

IN_FEATURES = 32


class ThreeModes(nn.Module):
    """default (r=8) -> mini (r=5 on 48 inputs: a partial shard; mini_r=10) -> bat (r=8)."""

    def __init__(self) -> None:
        super().__init__()
        self.l_default = MissLinear(nn.Linear(IN_FEATURES, 48), r=8, init_weights=False)
        self.l_mini = MissLinear(nn.Linear(48, 40), r=5, mode="mini", mini_r=10, init_weights=False)
        self.l_bat = MissLinear(nn.Linear(40, 24), r=8, mode="bat", init_weights=False)
        with torch.no_grad():
            for layer in self.miss_layers():
                layer.miss_block.uniform_(-0.3, 0.3)

    def miss_layers(self):
        return [self.l_default, self.l_mini, self.l_bat]

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l_default(x))
        h = torch.tanh(self.l_mini(h))
        return self.l_bat(h)


def call_targets(graph_module) -> list:
    """The call_function targets of an exported program's graph, in order."""
    return [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
