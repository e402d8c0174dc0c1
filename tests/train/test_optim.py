"""StableAdamW assembly: parameter groups, a CPU step, no decay on norm weights."""
from __future__ import annotations

import pytest
import torch

from modernbert_train.train.config import OptimizerConfig
from modernbert_train.train.optim import build_optimizer, split_decay_params

# Tests use large decays so one step shows them; optimi warns that such values are high.
pytestmark = pytest.mark.filterwarnings("ignore:You are using weight_decay")


class TinyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8, bias=False)
        self.proj = torch.nn.Linear(8, 4, bias=True)
        self.out = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.out(self.proj(self.norm(x)))


def _model() -> TinyBlock:
    torch.manual_seed(0)
    return TinyBlock()


def test_groups_split_norms_and_biases():
    model = _model()
    decay, no_decay = split_decay_params(model)
    assert [n for n, _ in decay] == ["proj.weight", "out.weight"]
    assert sorted(n for n, _ in no_decay) == ["norm.weight", "proj.bias"]

    opt = build_optimizer(OptimizerConfig(weight_decay=1e-2), model, device_type="cpu")
    wds = [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups]
    assert wds == [(2, 1e-2), (2, 0.0)], wds
    assert all(g["decouple_lr"] and g["triton"] is False for g in opt.param_groups), opt.param_groups


def test_no_exclusion_gives_one_group():
    cfg = OptimizerConfig(exclude_norms_and_biases_from_weight_decay=False)
    opt = build_optimizer(cfg, _model(), device_type="cpu")
    assert [len(g["params"]) for g in opt.param_groups] == [4]


def test_cpu_step_changes_params():
    model = _model()
    opt = build_optimizer(OptimizerConfig(lr=1e-2), model, device_type="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(torch.randn(5, 8)).square().mean()
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        delta = (p.detach() - before[name]).abs().max().item()
        assert delta > 0, f"{name} did not move"


def test_weight_decay_only_on_matrices():
    """With zero gradients only weight decay acts: matrices shrink by exactly (1 - wd), norms don't."""
    model = _model()
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    wd = 0.1  # fully decoupled: the factor is (1 - wd * lr/max_lr) = 0.9, independent of lr
    opt = build_optimizer(OptimizerConfig(lr=1e-3, weight_decay=wd), model, device_type="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.norm.weight.detach(), before["norm.weight"])
    torch.testing.assert_close(model.proj.bias.detach(), before["proj.bias"])
    for name in ("proj.weight", "out.weight"):
        got = dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(got, before[name] * (1 - wd), msg=lambda m: f"{name}: {m}")


def test_decay_follows_schedule_fraction():
    """When the scheduler halves the lr, fully decoupled decay halves too (lr / max_lr)."""
    model = _model()
    wd = 0.1
    opt = build_optimizer(OptimizerConfig(lr=1e-3, weight_decay=wd), model, device_type="cpu")
    for g in opt.param_groups:
        g["lr"] = 0.5e-3
    before = model.out.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.out.weight.detach(), before * (1 - wd * 0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_runs():
    model = _model().cuda()
    opt = build_optimizer(OptimizerConfig(), model, device_type="cuda")
    model(torch.randn(5, 8, device="cuda")).sum().backward()
    opt.step()
    assert torch.isfinite(model.out.weight).all()
