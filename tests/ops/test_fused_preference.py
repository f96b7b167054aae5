"""fused_linear_preference_loss / fused_linear_kto_loss on every fused backend against the float64 oracle.

The oracle is the eager chain: reference.linear_token_logprobs (full logits) -> sequence sums (or means) ->
the TRL-verbatim reference loss (ptkernels.reference.preference).
"""

import pytest
import torch

from ptkernels import reference
from ptkernels.ops.fused_kto import fused_linear_kto_loss
from ptkernels.ops.fused_preference import FUSED_LOSS_TYPES, fused_linear_preference_loss
from ptkernels.reference import preference as ref_pref
from ptkernels.reference.sequence import sequence_logprobs
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth, rand

B, T, D, V, D_REF = 3, 7, 11, 37, 5  # odd sizes; 3 pairs = 6 sequences
REF_FREE = ("simpo", "orpo", "cpo")
OUT_FIELDS = ("loss", "losses", "chosen_rewards", "rejected_rewards", "reward_accuracy", "reward_margin",
              "chosen_logps", "rejected_logps", "nll_loss", "log_odds_ratio", "log_odds_chosen")


def make_labels(n_seq, t=T, seed=0):
    """Prompt (and some padding) masked with -100; prompt lengths vary so pairs have different sizes."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (n_seq, t), generator=gen)
    for i in range(n_seq):
        y[i, : 1 + i % 3] = -100
    y[1, t - 2:] = -100  # padding at the end of one sequence
    return y.to(DEVICE)


def problem(dtype=torch.float64, scale=1.0):
    hidden = rand(2 * B, T, D, dtype=dtype, scale=scale)
    weight = rand(V, D, dtype=dtype, scale=0.5)
    bias = rand(V, dtype=dtype, scale=0.3)
    labels = make_labels(2 * B)
    ref_hidden = rand(2 * B, T, D_REF, dtype=dtype, requires_grad=False)
    ref_weight = rand(V, D_REF, dtype=dtype, requires_grad=False, scale=0.5)
    ref_bias = rand(V, dtype=dtype, requires_grad=False, scale=0.3)
    return hidden, weight, bias, labels, dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)


def options(loss_type):
    smoothed = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo")  # the types that read it
    kw = dict(loss_type=loss_type, beta=0.2, label_smoothing=0.15 if loss_type in smoothed else 0.0)
    if loss_type == "simpo":
        kw.update(beta=1.5, simpo_gamma=0.4)
    return kw


def oracle_defaults(loss_type, nll_weight=None, average_logps=None):
    avg = loss_type in ("simpo", "orpo") if average_logps is None else average_logps
    nll = (1.0 if loss_type in ("orpo", "cpo") else 0.0) if nll_weight is None else nll_weight
    return dict(nll_weight=nll, average_logps=avg)


def compare(ours, truth, inputs, rtol, what=""):
    for name in OUT_FIELDS:
        a, b = getattr(ours, name), getattr(truth, name)
        assert (a is None) == (b is None), f"{what}: {name} is {a} vs {b}"
        if a is not None:
            assert_close_to_truth(a, b, rtol, f"{what} {name}")
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    g_ours = torch.autograd.grad(ours.loss, inputs)
    g_truth = torch.autograd.grad(truth.loss, inputs)
    for i, (a, b) in enumerate(zip(g_ours, g_truth)):
        assert_close_to_truth(a, b, rtol, f"{what} grad {('hidden', 'weight', 'bias')[i]}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("loss_type", FUSED_LOSS_TYPES)
def test_every_loss_type_matches_reference(backend, loss_type):
    """Reference log-probs from the reference model's hidden states (DPO family); chunk_size=8 packs the short
    pairs several to a chunk and splits the longest pair over blocks (the 4-GEMM path)."""
    hidden, weight, bias, labels, ref = problem()
    if loss_type in REF_FREE:
        ref = {}
    kw = options(loss_type)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, chunk_size=8, backend=backend, **ref,
                                        **kw)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, **ref, **kw,
                                            **oracle_defaults(loss_type))
    compare(ours, truth, (hidden, weight, bias), 1e-9, f"{backend}/{loss_type}")
    assert ours.losses.shape == (B,) and ours.loss.dim() == 0
    assert not ours.losses.requires_grad and not ours.chosen_rewards.requires_grad


def test_oracle_is_the_eager_chain():
    """The oracle equals token log-probs -> sequence sums -> TRL's DPO loss written out here."""
    hidden, weight, bias, labels, _ = problem()
    rc, rr = rand(B, requires_grad=False, scale=5.0), rand(B, requires_grad=False, scale=5.0)
    tok = reference.linear_token_logprobs(hidden, weight, labels, bias=bias)
    seq = sequence_logprobs(tok, labels != -100)
    u = 0.1 * ((seq[:B] - seq[B:]) - (rc - rr))
    trl = (-torch.nn.functional.logsigmoid(u)).mean()
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                        backend=FUSED_BACKENDS[0])
    assert_close_to_truth(ours.loss, trl, 1e-10, "loss")
    g = torch.autograd.grad(ours.loss, (hidden, weight))
    g_trl = torch.autograd.grad(trl, (hidden, weight))
    for a, b in zip(g, g_trl):
        assert_close_to_truth(a, b, 1e-10, "grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_reference_given_equals_reference_computed(backend, loss_type):
    hidden, weight, bias, labels, ref = problem()
    with torch.no_grad():
        tok = reference.linear_token_logprobs(ref["ref_hidden"], ref["ref_weight"], labels, bias=ref["ref_bias"])
        ref_seq = sequence_logprobs(tok, labels != -100)  # summed: ipo divides inside the loss (TRL 1.16)
    computed = fused_linear_preference_loss(hidden, weight, labels, bias=bias, loss_type=loss_type, backend=backend,
                                            **ref)
    given = fused_linear_preference_loss(hidden, weight, labels, bias=bias, loss_type=loss_type, backend=backend,
                                         ref_chosen_logps=ref_seq[:B], ref_rejected_logps=ref_seq[B:])
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards"):
        assert_close_to_truth(getattr(given, name), getattr(computed, name), 1e-12, name)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, loss_type=loss_type,
                                            ref_chosen_logps=ref_seq[:B], ref_rejected_logps=ref_seq[B:],
                                            **oracle_defaults(loss_type))
    compare(given, truth, (hidden, weight, bias), 1e-9, loss_type)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero", "simpo"])
def test_nll_term(backend, loss_type):
    """RPO-style NLL on the chosen completions: nll = -mean over chosen tokens of log p."""
    hidden, weight, bias, labels, ref = problem()
    if loss_type in REF_FREE:
        ref = {}
    kw = dict(options(loss_type), nll_weight=0.7)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend=backend, **ref, **kw)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, **ref, **kw,
                                            average_logps=loss_type == "simpo")
    compare(ours, truth, (hidden, weight, bias), 1e-9, loss_type)
    ce = reference.linear_cross_entropy(hidden[:B], weight, labels[:B], bias=bias)  # the chosen tokens' CE
    assert_close_to_truth(ours.nll_loss, ce, 1e-10, "nll = chosen cross-entropy")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("sync_free", [False, True])
def test_options_shift_temperature_softcap(backend, sync_free):
    hidden, weight, bias, labels, ref = problem()
    kw = dict(loss_type="sigmoid", beta=0.3, shift=True, temperature=0.7, softcap=4.0, average_logps=True)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend=backend, sync_free=sync_free,
                                        chunk_size=16, **ref, **kw)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, nll_weight=0.0, **ref, **kw)
    compare(ours, truth, (hidden, weight, bias), 1e-9, "options")


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 1000])
def test_chunk_sizes_agree(chunk_size):
    hidden, weight, bias, labels, ref = problem()
    kw = dict(loss_type="bco_pair", nll_weight=0.5, **ref)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, chunk_size=chunk_size, backend="torch",
                                        **kw)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, average_logps=False, **kw)
    compare(ours, truth, (hidden, weight, bias), 1e-10, f"chunk {chunk_size}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bco_pair_with_given_delta_and_reference_free(backend):
    hidden, weight, bias, labels, ref = problem()
    for kw in (dict(loss_type="bco_pair", bco_delta=-0.3, **ref), dict(loss_type="bco_pair", reference_free=True),
               dict(loss_type="hinge", reference_free=True, beta=0.05)):
        ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend=backend, chunk_size=8, **kw)
        truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, nll_weight=0.0,
                                                average_logps=False, **kw)
        compare(ours, truth, (hidden, weight, bias), 1e-9, str(kw.get("loss_type")))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_against_float64_truth(backend, dtype):
    hidden, weight, bias, labels, ref = problem(dtype=dtype)
    ref = {k: v for k, v in ref.items()}
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend=backend, nll_weight=0.3, **ref)
    assert ours.loss.dtype == torch.float32
    g = torch.autograd.grad(ours.loss, (hidden, weight, bias))
    assert g[0].dtype == dtype and g[1].dtype == dtype
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref64 = {k: v.double() for k, v in ref.items()}
    truth = ref_pref.linear_preference_loss(h64, w64, labels, bias=b64, nll_weight=0.3, **ref64)
    g64 = torch.autograd.grad(truth.loss, (h64, w64, b64))
    if dtype == torch.float32:
        assert_close_to_truth(ours.loss, truth.loss, 1e-5, "loss")
        for a, b in zip(g, g64):
            assert_close_to_truth(a, b, 1e-5, "grad")
        return
    # bf16: no worse than eager PyTorch in bf16 (plus a small tolerance)
    eager = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, nll_weight=0.3, **ref)
    g_eager = torch.autograd.grad(eager.loss, (hidden, weight, bias))
    assert (ours.loss.double() - truth.loss).abs() <= (eager.loss.double() - truth.loss).abs() + 2e-2
    for a, e, t in zip(g, g_eager, g64):
        assert (a.double() - t).abs().max() <= (e.double() - t).abs().max() + 2e-2


def test_frozen_head_and_no_grad():
    hidden, weight, bias, labels, ref = problem()
    w = weight.detach()
    out = fused_linear_preference_loss(hidden, w, labels, backend="torch", **ref)
    (gh,) = torch.autograd.grad(out.loss, (hidden,))
    truth = ref_pref.linear_preference_loss(hidden, w, labels, nll_weight=0.0, **ref)
    assert_close_to_truth(gh, torch.autograd.grad(truth.loss, (hidden,))[0], 1e-10, "grad hidden")
    with torch.no_grad():
        out = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend="torch", **ref)
    assert not out.loss.requires_grad
    assert_close_to_truth(out.loss, ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias,
                                                                    nll_weight=0.0, **ref).loss, 1e-10, "loss")


def test_reference_head_defaults_to_policy_head():
    hidden, weight, bias, labels, _ = problem()
    ref_hidden = rand(2 * B, T, D, requires_grad=False)
    a = fused_linear_preference_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, backend="torch")
    b = fused_linear_preference_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                                     ref_weight=weight.detach(), ref_bias=bias.detach(), backend="torch")
    assert_close_to_truth(a.loss, b.loss, 1e-14, "loss")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_reference_backend_agrees(backend):
    hidden, weight, bias, labels, ref = problem()
    a = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend="reference", loss_type="orpo")
    b = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend=backend, loss_type="orpo")
    compare(b, a, (hidden, weight, bias), 1e-9, "orpo")


# ------------------------------------------------------------------------------------------------ KTO


def kto_problem():
    n = 5
    hidden, weight, bias = rand(n, T, D), rand(V, D, scale=0.5), rand(V, scale=0.3)
    labels = make_labels(n, seed=3)
    desirable = torch.tensor([True, False, False, True, False], device=DEVICE)
    return hidden, weight, bias, labels, desirable


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_source", ["none", "given", "kl_hidden+ref_kl_logps", "kl_hidden+ref_kl_hidden"])
def test_kto_matches_reference(backend, loss_type, kl_source):
    hidden, weight, bias, labels, desirable = kto_problem()
    ref_hidden = rand(5, T, D_REF, requires_grad=False)
    ref_weight = rand(V, D_REF, requires_grad=False, scale=0.5)
    kw = dict(loss_type=loss_type, beta=0.3, desirable_weight=1.3, undesirable_weight=0.8)
    if kl_source == "given":
        kw["kl"] = 0.35
    elif kl_source.startswith("kl_hidden"):
        kw.update(kl_hidden=rand(4, T + 2, D, requires_grad=False), kl_labels=make_labels(4, T + 2, seed=7))
        if kl_source.endswith("ref_kl_logps"):
            kw["ref_kl_logps"] = -40.0 + rand(4, requires_grad=False)
        else:
            kw["ref_kl_hidden"] = rand(4, T + 2, D_REF, requires_grad=False)
    ours = fused_linear_kto_loss(hidden, weight, labels, desirable, bias=bias, ref_hidden=ref_hidden,
                                 ref_weight=ref_weight, chunk_size=8, backend=backend, **kw)
    truth = ref_pref.linear_kto_loss(hidden, weight, labels, desirable, bias=bias, ref_hidden=ref_hidden,
                                     ref_weight=ref_weight, **kw)
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards", "kl"):
        assert_close_to_truth(getattr(ours, name), getattr(truth, name), 1e-9, name)
    if kl_source.startswith("kl_hidden"):
        assert float(truth.kl) >= 0
    g = torch.autograd.grad(ours.loss, (hidden, weight, bias))
    g_truth = torch.autograd.grad(truth.loss, (hidden, weight, bias))
    for a, b in zip(g, g_truth):
        assert_close_to_truth(a, b, 1e-9, "grad")


def test_kto_ref_logps_given():
    hidden, weight, bias, labels, desirable = kto_problem()
    ref_logps = -30.0 + rand(5, requires_grad=False)
    ours = fused_linear_kto_loss(hidden, weight, labels, desirable, bias=bias, ref_logps=ref_logps, kl=0.1,
                                 backend="torch")
    truth = ref_pref.linear_kto_loss(hidden, weight, labels, desirable, bias=bias, ref_logps=ref_logps, kl=0.1)
    assert_close_to_truth(ours.loss, truth.loss, 1e-10, "loss")
    assert_close_to_truth(torch.autograd.grad(ours.loss, hidden)[0], torch.autograd.grad(truth.loss, hidden)[0],
                          1e-10, "grad hidden")


# ---------------------------------------------------------------------------------------------- errors


def test_errors_are_clear():
    hidden, weight, bias, labels, ref = problem()
    rc = rand(B, requires_grad=False)
    with pytest.raises(ValueError, match="even"):
        fused_linear_preference_loss(hidden[:5], weight, labels[:5], **ref)
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'.*sigmoid.*simpo, orpo, cpo"):
        fused_linear_preference_loss(hidden, weight, labels, loss_type="dpo", **ref)
    with pytest.raises(ValueError, match="not both"):
        fused_linear_preference_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rc, **ref)
    with pytest.raises(ValueError, match="needs the reference model"):
        fused_linear_preference_loss(hidden, weight, labels)
    with pytest.raises(ValueError, match="uses no reference model"):
        fused_linear_preference_loss(hidden, weight, labels, loss_type="simpo", **ref)
    with pytest.raises(ValueError, match="ref_rejected_logps has 2 .* ref_chosen_logps has 3"):
        fused_linear_preference_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rc[:2])
    with pytest.raises(ValueError, match="ref_chosen_logps has 2 entries but hidden holds 3 pairs"):
        fused_linear_preference_loss(hidden, weight, labels, ref_chosen_logps=rc[:2], ref_rejected_logps=rc[:2])
    with pytest.raises(ValueError, match="ref_hidden has shape .* but hidden has shape"):
        fused_linear_preference_loss(hidden, weight, labels, ref_hidden=ref["ref_hidden"][:, :3],
                                     ref_weight=ref["ref_weight"])
    with pytest.raises(ValueError, match="ref_weight has shape .* same vocabulary"):
        fused_linear_preference_loss(hidden, weight, labels, ref_hidden=ref["ref_hidden"],
                                     ref_weight=ref["ref_weight"][:5])
    with pytest.raises(ValueError, match="labels has shape .* hidden"):
        fused_linear_preference_loss(hidden, weight, labels[:, :4], **ref)
    with pytest.raises(ValueError, match="3-D"):
        fused_linear_preference_loss(hidden[:, 0], weight, labels[:, 0], **ref)
    with pytest.raises(ValueError, match="labels"):  # a value check: on CUDA a device-side assert (test_gpu.py)
        fused_linear_preference_loss(hidden.detach().cpu(), weight.detach().cpu(), labels.cpu().clamp(min=0) + V,
                                     **{k: t.detach().cpu() for k, t in ref.items()})
    kh, kw_, kb, kl_labels, desirable = kto_problem()
    with pytest.raises(ValueError, match="exactly one"):
        fused_linear_kto_loss(kh, kw_, kl_labels, desirable)
    with pytest.raises(TypeError, match="desirable"):
        fused_linear_kto_loss(kh, kw_, kl_labels, desirable.long(), ref_logps=rand(5, requires_grad=False))
    with pytest.raises(ValueError, match="kl_labels"):
        fused_linear_kto_loss(kh, kw_, kl_labels, desirable, ref_logps=rand(5, requires_grad=False), kl_hidden=kh)


DPO_OPTION_CASES = [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type="sigmoid", ld_alpha=0.3),
    dict(loss_type="aot", ld_alpha=0.2, label_smoothing=0.1, shift=True),
    dict(loss_type="ipo", f_divergence_type="js_divergence", shift=True),
    dict(loss_type="sigmoid_norm", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="discopop", discopop_tau=0.2, use_weighting=True),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], use_weighting=True, ld_alpha=0.5),
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", range(len(DPO_OPTION_CASES)))
def test_dpo_options_match_reference(backend, case):
    """MPO lists, LD-DPO, f-divergences, WPO and the batch-coupled paths (aot, WPO-weighted sft) with gradients;
    chunk_size=8 splits the longest pair over blocks."""
    hidden, weight, bias, labels, ref = problem()
    kw = dict(DPO_OPTION_CASES[case], beta=0.2)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, chunk_size=8, backend=backend, **ref, **kw)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, **ref, nll_weight=0.0,
                                            average_logps=False,
                                            seq_lengths=(labels != -100).sum(1) if kw.get("shift") else None, **kw)
    compare(ours, truth, (hidden, weight, bias), 1e-9, f"{backend}/{kw}")


@pytest.mark.parametrize("loss_type", ["simpo", "cpo"])
def test_alphapo_fused(loss_type):
    hidden, weight, bias, labels, _ = problem()
    kw = dict(loss_type=loss_type, beta=1.5, alpha=0.3, label_smoothing=0.1)
    ours = fused_linear_preference_loss(hidden, weight, labels, bias=bias, backend=FUSED_BACKENDS[0], **kw)
    truth = ref_pref.linear_preference_loss(hidden, weight, labels, bias=bias, **kw, **oracle_defaults(loss_type))
    compare(ours, truth, (hidden, weight, bias), 1e-9, loss_type)
