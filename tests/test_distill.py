"""Distillation in fine-tuning: the loss as Hinton et al. define it, weight 0 as the task loss alone, and the
pipeline's teacher as the model its budget judges against."""

import copy

import pytest
import torch
import torch.nn.functional as F

from compress import data as data_mod
from compress import method as method_mod
from compress.config import FineTune
from compress.models import create_model
from compress.recipe import Recipe
from compress.search import pipeline
from compress.train import distill_loss, fit


@pytest.fixture(scope="module")
def digits():
    return data_mod.split(data_mod.load("digits"), 0.2, seed=0)


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(0)
    m = create_model("lenet300", input_size=8)
    fit(m, digits[0], FineTune(epochs=3, lr=2e-3), progress=False)
    return m


def test_distill_loss_is_t_squared_kl_of_the_softened_outputs():
    """T^2 * mean over the batch of sum_k p_t,k (log p_t,k - log p_s,k), with p = softmax(z / T): by hand."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 10, generator=g) * 3, torch.randn(5, 10, generator=g) * 3
    for temp in (1.0, 4.0):
        ps, pt = (s / temp).exp(), (t / temp).exp()
        ps, pt = ps / ps.sum(1, keepdim=True), pt / pt.sum(1, keepdim=True)
        by_hand = sum(float((pt[i] * (pt[i].log() - ps[i].log())).sum()) for i in range(5)) / 5 * temp**2
        assert float(distill_loss(s, t, temp)) == pytest.approx(by_hand, rel=1e-5)
    assert float(distill_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    # its gradient on the student's logits: T * (p_s - p_t) / N, the soft targets' pull (Hinton et al., eq. 2)
    z = s.clone().requires_grad_()
    distill_loss(z, t, 4.0).backward()
    expected = 4.0 * (F.softmax(s / 4, 1) - F.softmax(t / 4, 1)) / 5
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_weight_zero_is_the_task_loss_alone_and_runs_no_teacher(mlp, digits):
    tr, _ = digits
    calls = []
    teacher = copy.deepcopy(mlp)
    teacher.register_forward_hook(lambda *a: calls.append(1))
    plain, zero, half = (copy.deepcopy(mlp) for _ in range(3))
    fit(plain, tr, FineTune(epochs=1, lr=1e-3, seed=3), progress=False)
    fit(zero, tr, FineTune(epochs=1, lr=1e-3, seed=3, distill=4.0, distill_weight=0.0), teacher=teacher, progress=False)
    assert not calls  # weight 0: no forward pass of the teacher is paid for
    for a, b in zip(plain.state_dict().values(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    fit(half, tr, FineTune(epochs=1, lr=1e-3, seed=3, distill=4.0, distill_weight=0.5), teacher=teacher, progress=False)
    assert calls  # a positive weight does change the training
    pairs = zip(plain.state_dict().values(), half.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_the_pipelines_teacher_is_its_input_model_for_every_candidate(mlp, digits, monkeypatch):
    """A recipe's finetune.distill (no distill= argument): every candidate of an iterative search learns from the
    input model, the one the budget judges against -- not from the candidate it goes on from."""
    tr, va = digits
    seen = []
    real = method_mod.fit

    def spy(model, data, cfg=None, **kw):
        if kw.get("teacher") is not None:
            seen.append({k: v.clone() for k, v in kw["teacher"].state_dict().items()})
        return real(model, data, cfg, **kw)

    monkeypatch.setattr(method_mod, "fit", spy)
    recipe = Recipe.from_dict(
        {
            "stage": [
                {
                    "method": "threshold",
                    "sparsity": [0.5, 0.7],
                    "rounds": 1,
                    "finetune": {"epochs": 0.2, "distill": 2.0},
                }
            ]
        }
    )
    # a large budget: both candidates are kept in turn, the second going on from the first (pruned) one
    pipeline(copy.deepcopy(mlp), tr, recipe, max_accuracy_drop=50, val_data=va, latency=False)
    assert len(seen) == 2
    for teacher in seen:
        for k, v in mlp.state_dict().items():
            assert torch.equal(teacher[k], v), k
