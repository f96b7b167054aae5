"""memory="compact" (ops/core/vocab_blocks.py) for the fused sequence losses: fused_linear_preference_loss (DPO
family, SimPO, ORPO, CPO), fused_linear_kto_loss and fused_linear_grpo_loss. The loops keep each scored token's
lse and d loss / d logp, and backward forms dW and db one vocabulary block at a time: checked against the float64
reference on odd shapes (V = 37 spans 4 blocks of 8 columns and one of 5; 5-row tiles), against the default path
to float64 rounding (the incoming gradient != 1 too), in fp32 / bf16 against the rule of the existing tests, and
for the absence of an fp32 [V, D] buffer."""

import pytest
import torch
import torch.nn.functional as F

import ptkernels as ptk
from ptkernels.ops.backends.base import GRPO_KINDS
from ptkernels.ops.core import vocab_blocks
from ptkernels.ops.fused_kto import fused_linear_kto_loss
from ptkernels.ops.fused_preference import FUSED_LOSS_TYPES, fused_linear_preference_loss
from ptkernels.reference import preference as ref_pref
from ptkernels.reference import rl as ref_rl
from ptkernels.types import COV_LOSS_TYPES
from ptkernels.types import LOSS_TYPES as GRPO_LOSS_TYPES
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth, bf16_store_slack, rand
from tests.ops.test_compact_memory import _LargestFloat32
from tests.ops.test_fused_preference import (
    D_REF,
    REF_FREE,
    B,
    T,
    V,
    compare,
    kto_problem,
    make_labels,
    options,
    oracle_defaults,
    problem,
)

BLOCK_V, TILE = 8, 5


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks small enough that V = 37 spans five vocabulary blocks and the scored rows several row tiles."""
    monkeypatch.setattr(vocab_blocks, "block_shape", lambda v, d, device: (min(BLOCK_V, v), TILE))


def _rtol(backend):
    # The Triton kernels take scalar options as fp32, so fp64 inputs are exact only to ~1e-8 there.
    return 1e-9 if backend != "triton" else 1e-6


def _grads(loss, inputs, scale=1.0):
    return torch.autograd.grad(loss * scale, [t for t in inputs if t is not None])


def _assert_same(a_grads, b_grads, what):
    for name, a, b in zip(("hidden", "weight", "bias"), a_grads, b_grads):
        assert_close_to_truth(a, b, 1e-12, f"{what} grad {name}")


# ------------------------------------------------------------------------------------------- preference


@pytest.mark.parametrize("loss_type", FUSED_LOSS_TYPES)
def test_preference_every_loss_type_matches_reference(small_blocks, loss_type):
    """chunk_size=8 packs short pairs several to a chunk and splits the longest over blocks (its logits
    recomputed for d hidden; the weight pass needs only the saved lse)."""
    hidden, weight, bias, labels, ref = problem()
    if loss_type in REF_FREE:
        ref = {}
    kw = options(loss_type)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, chunk_size=8, memory="compact",
                                        backend="torch", **ref, **kw)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, **ref, **kw,
                                            **oracle_defaults(loss_type))
    compare(ours, truth, (hidden, weight, bias), 1e-9, f"compact/{loss_type}")


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "torch"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "aot", "orpo"])
def test_preference_backends_match_reference(small_blocks, backend, loss_type):
    """The other backends on a plain type, a batch-coupled one (aot: a scoring pass first) and one with the NLL
    term (orpo)."""
    hidden, weight, bias, labels, ref = problem()
    if loss_type in REF_FREE:
        ref = {}
    kw = options(loss_type)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, chunk_size=8, memory="compact",
                                        backend=backend, **ref, **kw)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, **ref, **kw,
                                            **oracle_defaults(loss_type))
    compare(ours, truth, (hidden, weight, bias), _rtol(backend), f"{backend}/{loss_type}")


PREFERENCE_CASES = [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], nll_weight=0.4),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_weighting=True, ld_alpha=0.5),  # coupled
    dict(loss_type="ipo", shift=True, temperature=0.7, softcap=4.0),
    dict(loss_type="simpo", nll_target=True),  # the NLL through linear_cross_entropy's compact path
]


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize(("backend", "case"), [(b, c) for b in FUSED_BACKENDS for c in range(len(PREFERENCE_CASES))
                                               if b != "triton" or c % 2 == 0])  # the interpreter is slow
def test_preference_compact_equals_default(small_blocks, backend, sync_free, case):
    """Same numbers as the default path in float64 (only the order of dW's sums differs), with an incoming
    gradient of 1.7 (folded into the weight pass's coefficients) and sync-free row selection."""
    hidden, weight, bias, labels, ref = problem()
    kw = dict(PREFERENCE_CASES[case], beta=0.2)
    if kw["loss_type"] == "simpo":
        ref = {}
    if kw.pop("nll_target", False):
        kw["nll_target"] = make_labels(2 * B, seed=5)
    runs = []
    for memory in ("default", "compact"):
        out = fused_linear_preference_loss(hidden, weight, labels, bias=bias, chunk_size=8, sync_free=sync_free,
                                           memory=memory, backend=backend, **ref, **kw)
        runs.append((out.loss, _grads(out.loss, (hidden, weight, bias), 1.7)))
    (a, ga), (b, gb) = runs
    assert_close_to_truth(b, a, 1e-12, "loss")
    _assert_same(gb, ga, str(kw))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_reference(small_blocks, backend, loss_type):
    """KTO's z0 from mismatched completions (a forward-only pass), reference log-probs from the reference head."""
    hidden, weight, bias, labels, desirable = kto_problem()
    kw = dict(loss_type=loss_type, beta=0.3, desirable_weight=1.3, undesirable_weight=0.8,
              ref_hidden=rand(5, T, D_REF, requires_grad=False),
              ref_weight=rand(V, D_REF, requires_grad=False, scale=0.5),
              kl_hidden=rand(4, T + 2, hidden.shape[-1], requires_grad=False), kl_labels=make_labels(4, T + 2, seed=7),
              ref_kl_logps=-40.0 + rand(4, requires_grad=False))
    ours = fused_linear_kto_loss(hidden, weight, labels, desirable, bias=bias, chunk_size=8, memory="compact",
                                 backend=backend, **kw)
    truth = ref_pref.linear_kto_loss(hidden, weight, labels, desirable, bias=bias, **kw)
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards", "kl"):
        assert_close_to_truth(getattr(ours, name), getattr(truth, name), _rtol(backend), name)
    for name, a, b in zip(("hidden", "weight", "bias"), _grads(ours.loss, (hidden, weight, bias)),
                          _grads(truth.loss, (hidden, weight, bias))):
        assert_close_to_truth(a, b, _rtol(backend), f"grad {name}")


# ------------------------------------------------------------------------------------------------- GRPO

GB, GT, GD = 4, 5, 7  # GRPO: 4 completions of 5 tokens (padding, an empty one, a single token), D = 7, V = 37


def _grpo_problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    hidden, weight, bias = mk(GB, GT, GD), mk(V, GD, scale=0.7), mk(V, scale=0.3)
    ids = torch.randint(0, V, (GB, GT), generator=g)
    mask = torch.ones(GB, GT, dtype=torch.int64)
    mask[1, 3:] = 0
    mask[2, :] = 0
    mask[3, 1:] = 0
    with torch.no_grad():
        lp = torch.log_softmax((hidden @ weight.T + bias) / 0.8, -1).gather(-1, ids[..., None])[..., 0]
    old = lp + mk(GB, GT, scale=0.3) + mk(GB, 1, scale=0.3)  # ratios past both clips
    refp = lp + mk(GB, GT, scale=0.3)
    adv = mk(GB).abs() * torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    to = lambda x: x.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return ([to(x).requires_grad_() for x in (hidden, weight, bias)], ids.to(DEVICE), mask.to(DEVICE),
            dict(old_logps=to(old), ref_logps=to(refp)), to(adv))


def _grpo_run(backend, memory, seed=0, grad_scale=1.0, **kw):
    (hidden, weight, bias), ids, mask, given, adv = _grpo_problem(seed)
    out = ptk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, bias=bias, beta=0.05, temperature=0.8,
                                     chunk_size=4, memory=memory, backend=backend,
                                     generator=torch.Generator().manual_seed(3), **given, **kw)
    return out, _grads(out.loss, (hidden, weight, bias), grad_scale)


def _grpo_compare(ours, truth, rtol, what):
    (o, og), (t, tg) = ours, truth
    for f in ("loss", "kl", "clip_ratio", "entropy"):
        if getattr(t, f) is not None:
            assert_close_to_truth(getattr(o, f), getattr(t, f), rtol, f"{what} {f}")
    for name, a, b in zip(("hidden", "weight", "bias"), og, tg):
        assert_close_to_truth(a, b, rtol, f"{what} grad {name}")


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_every_loss_type_matches_reference(small_blocks, loss_type):
    """Token level with an entropy bonus (its d loss / d H and E_p[s] enter the weight pass's coefficients); gmpo
    without it (TRL's GMPOTrainer has none: gmpo refuses entropy_coef != 0)."""
    kw = dict(loss_type=loss_type, entropy_coef=0.0 if loss_type == "gmpo" else 0.02, epsilon_high=0.25,
              delta=1.4 if GRPO_KINDS[loss_type] == 0 and loss_type not in COV_LOSS_TYPES else None)
    _grpo_compare(_grpo_run("torch", "compact", **kw), _grpo_run("reference", "default", **kw), 1e-9, loss_type)


GRPO_CASES = [
    dict(loss_type="dapo", entropy_coef=0.02),
    dict(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.03),  # chunks of whole sequences
    dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.02, sync_free=True),
    dict(loss_type="bnpo", off_policy_mask_threshold=0.1, sync_free=True),  # sequence-wide, sync-free slices
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", range(len(GRPO_CASES)))
def test_grpo_matches_reference_and_default(small_blocks, backend, case):
    """Against the float64 reference, and against the default path to float64 rounding with an incoming
    gradient of 0.6."""
    kw = GRPO_CASES[case]
    compact = _grpo_run(backend, "compact", **kw)
    _grpo_compare(compact, _grpo_run("reference", "default", **kw), _rtol(backend), f"{backend} {kw}")
    scaled = _grpo_run(backend, "compact", grad_scale=0.6, **kw)
    default = _grpo_run(backend, "default", grad_scale=0.6, **kw)
    _assert_same(scaled[1], default[1], f"{backend} {kw}")


# ------------------------------------------------------------------------------------------ fp32 / bf16


def _no_worse_than_eager(ours, eager, truth, backend, what):
    """The rule of test_compact_memory.py: |ours - truth| <= 1.1 |eager bf16 - truth| (x2 where the Triton
    interpreter rounds bf16 stores toward zero) + 1e-3 |truth|, in the Frobenius norm, truth in float64."""
    err_ours, err_eager = (ours.double() - truth).norm(), (eager.double() - truth).norm()
    slack = 1.1 * bf16_store_slack(backend, torch.bfloat16)
    assert err_ours <= slack * err_eager + 1e-3 * truth.norm(), (what, float(err_ours), float(err_eager))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preference_low_precision(small_blocks, backend, dtype):
    """fp32: within 1e-5 of the float64 truth; bf16: d hidden and dW (summed over 5 vocabulary blocks in fp32,
    rounded once) no worse than eager bf16 (the TRL-style chain on bf16 logits)."""
    hidden, weight, bias, labels, ref = problem(dtype=dtype, scale=2.0)
    kw = dict(loss_type="sigmoid", beta=0.5, nll_weight=0.3, average_logps=False)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, memory="compact", backend=backend,
                                        **ref, **kw)
    g = _grads(ours.loss, (hidden, weight, bias))
    assert all(a.dtype == dtype for a in g)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    truth = ref_pref.linear_preference_loss(h64, w64, labels, bias=b64, **{k: v.double() for k, v in ref.items()},
                                            **kw)
    g64 = _grads(truth.loss, (h64, w64, b64))
    if dtype == torch.float32:
        assert_close_to_truth(ours.loss, truth.loss, 1e-5, "loss")
        for name, a, b in zip(("hidden", "weight", "bias"), g, g64):
            assert_close_to_truth(a, b, 1e-5, f"grad {name}")
        return
    eager = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, **ref, **kw)
    g_eager = _grads(eager.loss, (hidden, weight, bias))
    assert (ours.loss.double() - truth.loss).abs() <= (eager.loss.double() - truth.loss).abs() + 1e-3 * truth.loss.abs()
    for name, a, e, t in zip(("hidden", "weight"), g, g_eager, g64):
        _no_worse_than_eager(a, e, t, backend, name)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_grpo_bf16_no_worse_than_eager(small_blocks, backend):
    """bf16 hidden / head: d hidden and dW no further from the float64 truth (on the bf16-rounded inputs) than
    eager bf16 (bf16 logits upcast to fp32, log_softmax + gather, the reference loss)."""
    (hidden, weight, _), ids, mask, given, adv = _grpo_problem(seed=2)
    kw = dict(beta=0.1, ref_logps=given["ref_logps"].detach().float(), temperature=0.8)
    old = given["old_logps"].detach().float()
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    ours = ptk.fused_linear_grpo_loss(h16, w16, ids, mask, adv.detach().float(), old_logps=old, memory="compact",
                                      backend=backend, **kw)
    g_ours = _grads(ours.loss, (h16, w16))
    assert all(a.dtype == torch.bfloat16 for a in g_ours)
    e16, ew16 = (t.detach().clone().requires_grad_() for t in (h16, w16))
    lp = torch.log_softmax(F.linear(e16, ew16).float() / 0.8, -1).gather(-1, ids[..., None])[..., 0]
    eager = ref_rl.grpo_loss(lp, old, adv.detach().float(), mask, ref_logps=kw["ref_logps"], beta=0.1)
    g_eager = _grads(eager.loss, (e16, ew16))
    h64, w64 = (t.detach().double().requires_grad_() for t in (h16, w16))
    truth = ptk.fused_linear_grpo_loss(h64, w64, ids, mask, adv.detach(), old_logps=old.double(), backend="reference",
                                       beta=0.1, ref_logps=kw["ref_logps"].double(), temperature=0.8)
    g_truth = _grads(truth.loss, (h64, w64))
    assert (ours.loss.double() - truth.loss).abs() <= (eager.loss.double() - truth.loss).abs() + 1e-5
    for name, a, e, t in zip(("hidden", "weight"), g_ours, g_eager, g_truth):
        _no_worse_than_eager(a, e, t, backend, name)


# --------------------------------------------------------------------------------------------- memory

MV, MD = 1000, 64  # a bf16 head [1000, 64]: the default path's fp32 accumulator has 64000 elements


def _preference_step(hidden, weight, labels, memory, backend):
    b = hidden.shape[0] // 2
    rc = torch.full((b,), -50.0, device=DEVICE)
    return fused_linear_preference_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rc,
                                        chunk_size=16, memory=memory, backend=backend).loss


def _kto_step(hidden, weight, labels, memory, backend):
    n = hidden.shape[0]
    desirable = torch.arange(n, device=DEVICE) % 2 == 0
    return fused_linear_kto_loss(hidden, weight, labels, desirable, ref_logps=torch.full((n,), -50.0, device=DEVICE),
                                 kl=0.1, chunk_size=16, memory=memory, backend=backend).loss


def _grpo_step(hidden, weight, labels, memory, backend):
    n, t = labels.shape
    mask = (labels != -100).long()
    return ptk.fused_linear_grpo_loss(hidden, weight, labels.clamp(min=0), mask,
                                      torch.linspace(-1, 1, n, device=hidden.device),
                                      entropy_coef=0.01, chunk_size=16, memory=memory, backend=backend).loss


def _largest_fp32(step, memory, backend):
    hidden = rand(6, 12, MD, dtype=torch.bfloat16)
    weight = rand(MV, MD, dtype=torch.bfloat16, scale=0.1)
    labels = make_labels(6, t=12, seed=1).clamp(max=MV - 1)
    with _LargestFloat32() as mode:
        loss = step(hidden, weight, labels, memory, backend)
        torch.autograd.grad(loss, (hidden, weight))
    return mode.largest


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])  # the interpreter hides ops
@pytest.mark.parametrize("step", [_preference_step, _kto_step, _grpo_step], ids=["preference", "kto", "grpo"])
def test_compact_never_allocates_a_float32_weight_sized_buffer(monkeypatch, backend, step):
    """The default path's largest fp32 tensor is the [1000, 64] accumulator; compact's is a chunk of logits
    ([<= 16, 1000]) or a block ([128, 64] accumulator, [16, 128] tile: 8 blocks). The default is measured too,
    so the check would see the accumulator if it came back."""
    monkeypatch.setattr(vocab_blocks, "block_shape", lambda v, d, device: (min(128, v), 16))
    assert _largest_fp32(step, "default", backend) >= MV * MD
    assert _largest_fp32(step, "compact", backend) <= 16 * MV < MV * MD


# ---------------------------------------------------------------------------------- options, modules


def test_partial_gradients(small_blocks):
    """Only the head needs a gradient (a frozen body: the loop runs no GEMM 2 and touches no logits after the
    forward), or only the hidden states (a frozen head: no weight pass)."""
    hidden, weight, bias, labels, ref = problem()
    for wanted in (weight, hidden):
        kw = dict(loss_type="sigmoid", beta=0.2, chunk_size=8, **ref)
        ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, memory="compact", backend="torch", **kw)
        truth = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend="reference", **kw)
        assert_close_to_truth(_grads(ours.loss, (wanted,))[0], _grads(truth.loss, (wanted,))[0], 1e-10, "grad")
    (h, w, b), ids, mask, given, adv = _grpo_problem()
    for wanted in (w, h):
        runs = [ptk.fused_linear_grpo_loss(h, w, ids, mask, adv, bias=b, chunk_size=4, memory=m, backend=be, **given)
                for m, be in (("compact", "torch"), ("default", "reference"))]
        a, t = (_grads(r.loss, (wanted,))[0] for r in runs)
        assert_close_to_truth(a, t, 1e-10, "grpo grad")


def test_bad_memory_is_rejected_by_name():
    hidden, weight, bias, labels, ref = problem()
    with pytest.raises(ValueError, match="memory"):
        fused_linear_preference_loss(hidden, weight, labels, memory="small", **ref)
    kh, kw, _, kl_labels, desirable = kto_problem()
    with pytest.raises(ValueError, match="memory"):
        fused_linear_kto_loss(kh, kw, kl_labels, desirable, ref_logps=rand(5, requires_grad=False), memory="auto")
    (h, w, _), ids, mask, _, adv = _grpo_problem()
    with pytest.raises(ValueError, match="memory"):
        ptk.fused_linear_grpo_loss(h, w, ids, mask, adv, memory="tiny")
    for module in (ptk.nn.FusedLinearPreferenceLoss, ptk.nn.FusedLinearKTOLoss, ptk.nn.FusedLinearGRPOLoss):
        with pytest.raises(ValueError, match="memory"):
            module(memory="none")


def test_modules_pass_memory_through(small_blocks):
    hidden, weight, bias, labels, ref = problem()
    loss_fn = ptk.nn.FusedLinearPreferenceLoss(memory="compact", backend="torch", chunk_size=8, **ref)
    ours = loss_fn(hidden, weight, labels, bias=bias)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, **ref, **oracle_defaults("sigmoid"))
    compare(ours, truth, (hidden, weight, bias), 1e-9, "module")
    (h, w, b), ids, mask, given, adv = _grpo_problem()
    ours = ptk.nn.FusedLinearGRPOLoss(memory="compact", backend="torch", chunk_size=4)(h, w, ids, mask, adv, bias=b)
    truth = ptk.fused_linear_grpo_loss(h, w, ids, mask, adv, bias=b, backend="reference")
    _grpo_compare((ours, _grads(ours.loss, (h, w, b))), (truth, _grads(truth.loss, (h, w, b))), 1e-9, "module")
