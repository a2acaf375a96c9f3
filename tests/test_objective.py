import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from img_guidance import ImplicitAligner, ReferenceTracker, iupo_loss
from img_guidance.objective import squared_distance

# Two samples of two features each (shape [B=2, N=1, D=2]).
PRED = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
REF = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])
W = torch.tensor([[[1.0, 1.0]], [[2.0, 0.0]]])
L = torch.tensor([[[0.0, 2.0]], [[0.0, 0.0]]])


def test_hand_computed_values():
    """Sample 1: d(w,pred) = (0+1)/2 = 0.5, d(w,ref) = 1, dw = -0.5;
    d(l,pred) = (1+4)/2 = 2.5, d(l,ref) = 2, dl = 0.5; dref = d(ref,pred) = 0.5.
    DPO margin = -(dw - dl) = 1, SPIN margin = -(dw - dref) = 1,
    L_pref = softplus(-2) = log(1 + e^-2) = 0.126928, L = 0.5 + 0.126928.
    Sample 2: pred = ref, so every margin is 0 and L_pref = log 2; d(w,pred) = (4+0)/2 = 2.
    Mean L = (0.626928 + 2.693147) / 2. Only sample 1 has pred strictly closer to w than ref."""
    loss, parts = iupo_loss(PRED, REF, W, L)
    l1 = 0.5 + math.log1p(math.exp(-2))
    l2 = 2.0 + math.log(2)
    assert loss.item() == pytest.approx((l1 + l2) / 2, abs=1e-6)
    assert parts["L_base"].item() == pytest.approx(1.25)
    assert parts["L_pref"].item() == pytest.approx((math.log1p(math.exp(-2)) + math.log(2)) / 2, abs=1e-6)
    assert parts["margin_dpo"].item() == pytest.approx(0.5)
    assert parts["margin_spin"].item() == pytest.approx(0.5)
    assert parts["win_fraction"].item() == pytest.approx(0.5)
    assert parts["policy_error"].item() == pytest.approx(1.25)
    assert parts["reference_error"].item() == pytest.approx((1.0 + 2.0) / 2)

    # DPO alone: softplus(-1) for sample 1
    loss_dpo, _ = iupo_loss(PRED, REF, W, L, terms=("dpo",))
    assert loss_dpo.item() == pytest.approx((0.5 + math.log1p(math.exp(-1)) + l2) / 2, abs=1e-6)
    # lam scales only the preference term
    loss_half, _ = iupo_loss(PRED, REF, W, L, lam=0.5)
    assert loss_half.item() == pytest.approx(
        (0.5 + 0.5 * math.log1p(math.exp(-2)) + 2.0 + 0.5 * math.log(2)) / 2, abs=1e-6
    )


@pytest.mark.parametrize("kwargs", [dict(terms=()), dict(lam=0.0)])
def test_base_only_ablation_is_the_mse(kwargs):
    loss, parts = iupo_loss(PRED, REF, W, L, **kwargs)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(PRED, W).item())
    assert loss.item() == pytest.approx(parts["L_base"].item())


def test_equation_16_equals_equation_17_up_to_one_over_two_sigma():
    """Eq. 16 written with explicit Gaussian log-likelihoods N(x | f(c), sigma I) (sigma is the
    variance) has the argument of Eq. 17 times 1/(2 sigma) when distances are sums of squares.
    iupo_loss uses per-element means, so its margins are Eq. 17's divided by the feature count."""
    torch.manual_seed(1)
    pred, ref, w, l = (torch.randn(5, 3, 4, dtype=torch.float64) for _ in range(4))
    sigma = 0.7

    def log_p(x, mean):
        normal = torch.distributions.Normal(mean, math.sqrt(sigma))
        return normal.log_prob(x).flatten(1).sum(1)

    log_ratio_w = log_p(w, pred) - log_p(w, ref)
    log_ratio_l = log_p(l, pred) - log_p(l, ref)
    log_ratio_ref = log_p(ref, pred) - log_p(ref, ref)
    eq16_argument = (log_ratio_w - log_ratio_l) + (log_ratio_w - log_ratio_ref)

    def sq(a, b):
        return (a - b).pow(2).flatten(1).sum(1)

    eq17_argument = -(2 * (sq(w, pred) - sq(w, ref)) - (sq(l, pred) - sq(l, ref)) - sq(ref, pred))
    torch.testing.assert_close(eq16_argument, eq17_argument / (2 * sigma))

    # our margins (mean convention) sum to Eq. 17's argument / D
    d = pred[0].numel()
    margins = -(
        (squared_distance(w, pred) - squared_distance(w, ref))
        - (squared_distance(l, pred) - squared_distance(l, ref))
    )
    margins = margins - ((squared_distance(w, pred) - squared_distance(w, ref)) - squared_distance(ref, pred))
    torch.testing.assert_close(margins, (eq17_argument / d).float(), rtol=1e-5, atol=1e-6)
    loss, parts = iupo_loss(pred, ref, w, l)
    expected = (sq(w, pred) / d + torch.nn.functional.softplus(-eq17_argument / d)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (parts["margin_dpo"] + parts["margin_spin"]).item() == pytest.approx(
        (eq17_argument / d).mean().item(), rel=1e-5
    )


def test_a_gradient_step_moves_pred_towards_w_and_away_from_l():
    torch.manual_seed(2)
    w, l = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    ref = (w + l) / 2 + 0.1 * torch.randn(4, 3, 8)
    pred = ref.clone().requires_grad_(True)
    for terms in [("dpo", "spin"), ("dpo",), ("spin",)]:
        loss, _ = iupo_loss(pred, ref, w, l, terms=terms)
        (grad,) = torch.autograd.grad(loss, pred)
        step = pred.detach() - 0.5 * grad
        assert (squared_distance(w, step) < squared_distance(w, pred.detach())).all()
    # the preference term alone pushes away from l (the base term is indifferent to l)
    loss, parts = iupo_loss(pred, ref, w, l, terms=("dpo",))
    (grad,) = torch.autograd.grad(loss - parts["L_base"], pred)
    step = pred.detach() - 0.5 * grad
    assert (squared_distance(l, step) > squared_distance(l, pred.detach())).all()


def test_no_gradient_flows_into_the_reference():
    ref = REF.clone().requires_grad_(True)
    pred = PRED.clone().requires_grad_(True)
    loss, _ = iupo_loss(pred, ref, W, L)
    loss.backward()
    assert ref.grad is None
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"one shape, got \(2, 1, 2\), \(2, 1, 2\), \(2, 1, 3\)"):
        iupo_loss(PRED, REF, torch.zeros(2, 1, 3), L)
    with pytest.raises(ValueError, match=r"\('dpo', 'ipo'\)"):
        iupo_loss(PRED, REF, W, L, terms=("dpo", "ipo"))
    with pytest.raises(ValueError, match="-1"):
        iupo_loss(PRED, REF, W, L, lam=-1)


# -- the reference tracker -------------------------------------------------------------------------


@pytest.fixture
def policy(tiny_config):
    return ImplicitAligner(**tiny_config)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def test_reference_is_an_independent_frozen_model(policy):
    tracker = ReferenceTracker(policy, k=3)
    ref = tracker.reference
    assert type(ref) is type(policy) and ref.config == policy.config
    assert ref is not policy
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    # independently initialised, not a copy of the policy
    assert not torch.equal(ref.proj_in.weight, policy.proj_in.weight)
    assert all(p.requires_grad for p in policy.parameters())


def test_tracker_replaces_after_exactly_k_consecutive_wins(policy):
    tracker = ReferenceTracker(policy, k=3)
    _perturb(policy)
    assert [tracker.observe(0.5, 1.0) for _ in range(2)] == [False, False]
    assert not torch.equal(tracker.reference.proj_in.weight, policy.proj_in.weight)
    assert tracker.observe(torch.tensor(0.5), torch.tensor(1.0)) is True  # the 3rd win
    assert tracker.replacements == 1 and tracker.count == 0
    for key, value in policy.state_dict().items():
        assert torch.equal(tracker.reference.state_dict()[key], value)
    assert not any(p.requires_grad for p in tracker.reference.parameters())
    # the copy is a snapshot: training the policy further leaves the reference alone
    _perturb(policy)
    assert not torch.equal(tracker.reference.proj_in.weight, policy.proj_in.weight)


def test_a_broken_streak_starts_over(policy):
    tracker = ReferenceTracker(policy, k=3)
    outcomes = [
        tracker.observe(p, r)
        for p, r in [(0.1, 1.0), (0.1, 1.0), (1.0, 1.0), (0.1, 1.0), (0.1, 1.0), (2.0, 1.0), (0.1, 1.0)]
    ]
    assert outcomes == [False] * 7  # a tie and a loss each reset the count
    assert tracker.count == 1 and tracker.replacements == 0
    assert tracker.observe(0.1, 1.0) is False
    assert tracker.observe(0.1, 1.0) is True


def test_tracker_state_round_trip(policy, tiny_config):
    tracker = ReferenceTracker(policy, k=4)
    tracker.observe(0.1, 1.0)
    tracker.observe(0.1, 1.0)
    state = tracker.state_dict()
    other = ReferenceTracker(ImplicitAligner(**tiny_config), k=4)
    other.load_state_dict(state)
    assert other.count == 2 and other.replacements == 0
    for key, value in tracker.reference.state_dict().items():
        assert torch.equal(other.reference.state_dict()[key], value)
    with pytest.raises(ValueError, match="k=4 but this tracker has k=5"):
        ReferenceTracker(policy, k=5).load_state_dict(state)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        ReferenceTracker(policy, k=0)


def _distributed_worker(rank: int, world: int, init_file: str, results: dict, cfg: dict) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    policy = ImplicitAligner(**cfg)  # identical on every rank, as DDP keeps it
    torch.manual_seed(100 + rank)  # different RNG states: the initial reference must still agree
    tracker = ReferenceTracker(policy, k=2)
    initial = tracker.reference.proj_in.weight.clone()
    # Rank 0 alone would see wins at every step and rank 1 losses at steps 1-2; only the averages
    # (policy 0.6 vs reference 1.0 from step 3 on) decide.
    local = {0: [(0.1, 1.0)] * 5, 1: [(2.0, 1.0), (2.0, 1.0), (1.1, 1.0), (1.1, 1.0), (1.1, 1.0)]}[rank]
    replaced = [tracker.observe(p, r) for p, r in local]
    results[rank] = (replaced, initial, tracker.reference.proj_in.weight.clone())
    torch.distributed.destroy_process_group()


def test_processes_replace_the_reference_at_the_same_step(tiny_config):
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(
            _distributed_worker,
            args=(2, os.path.join(tmp, "rendezvous"), results, tiny_config),
            nprocs=2,
            join=True,
        )
        (replaced0, initial0, final0), (replaced1, initial1, final1) = results[0], results[1]
    # averaged errors: steps 1-2 (1.05 vs 1.0) lose, steps 3, 4 win -> replace at step 4
    assert replaced0 == replaced1 == [False, False, False, True, False]
    assert torch.equal(initial0, initial1)
    assert torch.equal(final0, final1) and not torch.equal(final0, initial0)
