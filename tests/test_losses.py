"""Each loss against a naive per-element reference on seeded tensors: values and gradients."""

import math

import pytest
import torch

from rabtriever_ray.losses import forward_kl, jepa_loss, listwise_kl, reverse_kl


def _naive_softmax(row, temperature):
    scaled = [v / temperature for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def _naive_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _grad(fn, *tensors):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    fn(*leaves).backward()
    return [leaf.grad for leaf in leaves]


def _numeric_grad(fn, x, eps=1e-6):
    x = x.double()
    grad = torch.zeros_like(x)
    flat = x.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        up = fn(x).item()
        flat[i] = old - eps
        down = fn(x).item()
        flat[i] = old
        grad.view(-1)[i] = (up - down) / (2 * eps)
    return grad


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "cosine"])
def test_jepa_loss_matches_naive(kind, gen):
    pred = torch.randn(5, 7, generator=gen) * 2
    target = torch.randn(5, 7, generator=gen) * 2

    def naive(p, t):
        rows = []
        for pr, tr in zip(p.tolist(), t.tolist()):
            if kind == "mse":
                rows.append(sum((a - b) ** 2 for a, b in zip(pr, tr)) / len(pr))
            elif kind == "smooth_l1":
                rows.append(
                    sum(0.5 * (a - b) ** 2 if abs(a - b) < 1 else abs(a - b) - 0.5 for a, b in zip(pr, tr))
                    / len(pr)
                )
            else:
                dot = sum(a * b for a, b in zip(pr, tr))
                rows.append(1 - dot / (math.sqrt(sum(a * a for a in pr)) * math.sqrt(sum(b * b for b in tr))))
        return sum(rows) / len(rows)

    assert jepa_loss(pred, target, kind).item() == pytest.approx(naive(pred, target), rel=1e-5)
    (grad,) = _grad(lambda p: jepa_loss(p, target, kind), pred)
    numeric = _numeric_grad(lambda p: jepa_loss(p, target.double(), kind), pred)
    torch.testing.assert_close(grad.double(), numeric, atol=1e-5, rtol=1e-4)


def test_jepa_loss_rejects_bad_input(gen):
    with pytest.raises(ValueError, match="same shape"):
        jepa_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown jepa loss kind"):
        jepa_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l3")


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_reverse_and_forward_kl_match_naive(temperature, gen):
    student = torch.randn(6, 11, generator=gen) * 3
    teacher = torch.randn(6, 11, generator=gen) * 3
    rev = (
        sum(
            _naive_kl(_naive_softmax(s, temperature), _naive_softmax(t, temperature))
            for s, t in zip(student.tolist(), teacher.tolist())
        )
        / 6
    )
    fwd = (
        sum(
            _naive_kl(_naive_softmax(t, temperature), _naive_softmax(s, temperature))
            for s, t in zip(student.tolist(), teacher.tolist())
        )
        / 6
    )
    assert reverse_kl(student, teacher, temperature).item() == pytest.approx(rev, rel=1e-5)
    assert forward_kl(student, teacher, temperature).item() == pytest.approx(fwd, rel=1e-5)
    assert rev != pytest.approx(fwd, rel=1e-3)  # the two directions really differ on this data
    for fn in (reverse_kl, forward_kl):
        grad_s, grad_t = _grad(lambda s, t, fn=fn: fn(s, t, temperature), student, teacher)
        numeric_s = _numeric_grad(lambda s, fn=fn: fn(s, teacher.double(), temperature), student)
        numeric_t = _numeric_grad(lambda t, fn=fn: fn(student.double(), t, temperature), teacher)
        torch.testing.assert_close(grad_s.double(), numeric_s, atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(grad_t.double(), numeric_t, atol=1e-5, rtol=1e-3)


def test_kl_chunking_and_leading_dims_do_not_change_the_value(gen):
    student = torch.randn(2, 5, 13, generator=gen)
    teacher = torch.randn(2, 5, 13, generator=gen)
    whole = reverse_kl(student, teacher, chunk_rows=1000)
    chunked = reverse_kl(student, teacher, chunk_rows=3)
    flat = reverse_kl(student.reshape(10, 13), teacher.reshape(10, 13))
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert flat.item() == pytest.approx(whole.item(), rel=1e-6)


def test_kl_is_zero_for_identical_and_stable_for_extreme_logits(gen):
    vocab = 49152
    logits = torch.randn(3, vocab, generator=gen) * 5
    assert reverse_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-5)
    # Very negative and -inf logits (a masked vocabulary) in both distributions: finite value and gradients.
    student = logits.clone()
    teacher = logits.clone() + torch.randn(3, vocab, generator=gen)
    student[:, :100] = -1e30
    teacher[:, :100] = float("-inf")
    student[:, 100:200] = -1e4
    leaf = student.clone().requires_grad_(True)
    loss = reverse_kl(leaf, teacher)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(leaf.grad).all()
    # The masked columns carry no mass, so the value equals the KL over the remaining vocabulary.
    assert loss.item() == pytest.approx(reverse_kl(student[:, 100:], teacher[:, 100:]).item(), rel=1e-4)


def test_kl_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        reverse_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)


def test_listwise_kl_matches_naive_with_mask(gen):
    student = torch.randn(4, 6, generator=gen) * 2
    teacher = torch.randn(4, 6, generator=gen) * 2
    lengths = [6, 3, 1, 4]  # the third list has one candidate: no ranking signal, left out of the mean
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    temperature = 0.7
    naive = [
        _naive_kl(_naive_softmax(t[:n], temperature), _naive_softmax(s[:n], temperature))
        for s, t, n in zip(student.tolist(), teacher.tolist(), lengths)
        if n >= 2
    ]
    value = listwise_kl(student, teacher, temperature, mask)
    assert value.item() == pytest.approx(sum(naive) / len(naive), rel=1e-5)
    # Padding values must not matter.
    noisy = student.masked_fill(~mask, 1e6)
    assert listwise_kl(noisy, teacher, temperature, mask).item() == pytest.approx(value.item(), rel=1e-6)
    grad_s, _ = _grad(lambda s, t: listwise_kl(s, t, temperature, mask), student, teacher)
    numeric = _numeric_grad(lambda s: listwise_kl(s, teacher.double(), temperature, mask), student)
    torch.testing.assert_close(grad_s.double(), numeric, atol=1e-5, rtol=1e-3)
    assert (grad_s[~mask] == 0).all()


def test_listwise_kl_without_any_valid_list_is_zero_and_differentiable():
    student = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    value = listwise_kl(student, torch.randn(2, 3), 1.0, mask)
    value.backward()
    assert value.item() == 0.0 and student.grad is not None


def test_a_non_finite_loss_term_stops_naming_the_batch_and_the_term():
    from rabtriever_ray.losses import NonFiniteLoss, check_finite

    finite = {"jepa": torch.tensor(0.5), "rkl": torch.tensor(1.25), "total": torch.tensor(1.75)}
    check_finite(finite, "epoch 0, step 3")
    broken = {**finite, "rkl": torch.tensor(float("nan")), "total": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLoss, match=r"epoch 0, step 3: loss term 'rkl' is nan \(finite terms: \{'jepa': 0.5"):
        check_finite(broken, "epoch 0, step 3")
