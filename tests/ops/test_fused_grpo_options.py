"""fused_linear_grpo_loss with every GRPO-family loss type and option (TRL 1.16), every backend, against the
float64 reference (``reference.rl.linear_grpo_loss``: full logits, autograd): loss, metrics, d hidden, d weight."""

import pytest
import torch

from ptkernels.ops.fused_grpo import fused_linear_grpo_loss
from tests.helpers import DEVICE, FUSED_BACKENDS, assert_close_to_truth

B, T, D, V = 3, 5, 8, 13  # odd sizes; V not a power of two; chunk_size 4 splits sequences at the token level


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.tensor([1.0, -0.7, 0.4], dtype=torch.float64)
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids[..., None])[..., 0]
    old = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    refp = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    sampler = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    return tuple(t.to(DEVICE) for t in (hidden, weight, ids, mask, adv, old, refp, sampler))


CASES = [
    dict(loss_type="grpo", entropy_coef=0.01),
    dict(loss_type="dapo", top_entropy_quantile=0.5, entropy_coef=0.02),
    dict(loss_type="cispo", epsilon_high=1.1),
    dict(loss_type="sapo"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="vespo"),
    dict(loss_type="gmpo", epsilon_low=0.1, epsilon_high=0.1),
    dict(loss_type="grpo", bias_corrected_kl=False, importance_sampling_level="sequence"),
    dict(loss_type="dapo", sampler=True, vllm_importance_sampling_mode="token_truncate",
         vllm_importance_sampling_clip_max=1.2),
    dict(loss_type="dapo", sampler=True, vllm_importance_sampling_mode="sequence_mask",
         vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=1.5),
    dict(loss_type="grpo", off_policy_mask_threshold=0.0),
    dict(loss_type="grpo", importance_sampling_level="sequence", sampler=True,
         vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_max=1.3),
]
FIELDS = ("kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "entropy", "sampler_abs_logp_diff",
          "is_masked_fraction", "is_weight_mean", "is_weight_max")


def _run(backend, case, on_policy):
    hidden, weight, ids, mask, adv, old, refp, sampler = _problem()
    kw = dict(case)
    if kw.pop("sampler", False):
        kw["sampler_logps"] = sampler
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_linear_grpo_loss(h, w, ids, mask, adv, old_logps=None if on_policy else old, ref_logps=refp,
                                 beta=0.05, chunk_size=4, return_entropy=True, backend=backend, **kw)
    return out, torch.autograd.grad(out.loss, (h, w))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_grpo_options_match_reference(case, on_policy, backend):
    ours, (gh, gw) = _run(backend, CASES[case], on_policy)
    truth, (th, tw) = _run("reference", CASES[case], on_policy)
    what = f"{CASES[case]} on_policy={on_policy}"
    assert_close_to_truth(ours.loss, truth.loss, 1e-10, f"{what} loss")
    assert_close_to_truth(gh, th, 1e-10, f"{what} d hidden")
    assert_close_to_truth(gw, tw, 1e-10, f"{what} d weight")
    for f in FIELDS:
        if getattr(truth, f) is not None:
            assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-10, f"{what} {f}")


def test_fused_grpo_fp32_gmpo_and_sampler():
    """fp32 inputs: within 1e-5 of the float64 truth on the same (rounded) inputs."""
    hidden, weight, ids, mask, adv, old, refp, sampler = _problem(1)
    for kw in (dict(loss_type="gmpo"), dict(loss_type="cispo", sampler_logps=sampler.float(),
                                             vllm_importance_sampling_mode="token_truncate")):
        h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
        ours = fused_linear_grpo_loss(h32, w32, ids, mask, adv.float(), old_logps=old.float(), backend="torch", **kw)
        h64, w64 = h32.detach().double().requires_grad_(), w32.detach().double().requires_grad_()
        kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        truth = fused_linear_grpo_loss(h64, w64, ids, mask, adv, old_logps=old.float().double(), backend="reference",
                                       **kw64)
        assert ours.loss.dtype == torch.float32
        assert_close_to_truth(ours.loss, truth.loss, 1e-5, f"{kw} fp32 loss")
        assert_close_to_truth(torch.autograd.grad(ours.loss, h32)[0], torch.autograd.grad(truth.loss, h64)[0], 1e-5,
                              f"{kw} fp32 grad")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_fused_grpo_nan_sampler_logps(mode, backend):
    """NaN sampler log-probs (tokens the sampler could not score), on a valid token and on padding, across the
    chunks (chunk_size 4 splits sequences for the token modes): the mean |old - sampler| leaves them out of the sum
    and the count (TRL 1.16: delta[mask & ~isnan(delta)].mean()), the rest matches the reference."""
    hidden, weight, ids, mask, adv, old, refp, sampler = _problem()
    sampler = sampler.clone()
    sampler[0, 1], sampler[1, 4] = float("nan"), float("nan")
    kw = dict(old_logps=old, sampler_logps=sampler, vllm_importance_sampling_mode=mode,
              vllm_importance_sampling_clip_max=1.5, chunk_size=4)
    ours = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, backend=backend, **kw)
    truth = fused_linear_grpo_loss(hidden, weight, ids, mask, adv, backend="reference", **kw)
    delta = (old - sampler).abs()[mask.bool() & ~torch.isnan(old - sampler)]
    assert delta.numel() == 8  # 9 valid tokens, one of them NaN
    assert_close_to_truth(truth.sampler_abs_logp_diff, delta.mean(), 1e-14, "reference mean |diff|")
    assert_close_to_truth(ours.loss, truth.loss, 1e-10, "loss")
    for f in FIELDS[5:]:
        assert_close_to_truth(getattr(ours, f), getattr(truth, f), 1e-12, f)


def test_fused_grpo_option_errors():
    hidden, weight, ids, mask, adv, old, refp, sampler = _problem()
    with pytest.raises(ValueError, match="takes no sampler_logps"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, loss_type="gmpo", sampler_logps=sampler)
    with pytest.raises(ValueError, match="loss_type='gmpo' has no entropy bonus"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, loss_type="gmpo", entropy_coef=0.01)
    with pytest.raises(ValueError, match="loss_type='gmpo' has no off-policy sequence mask"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, loss_type="gmpo", off_policy_mask_threshold=0.0)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be one of"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, sampler_logps=sampler,
                               vllm_importance_sampling_mode="token")
    with pytest.raises(ValueError, match="needs vllm_importance_sampling_clip_min or"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, sampler_logps=sampler,
                               vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None)
    with pytest.raises(ValueError, match="top_entropy_quantile must be in"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, top_entropy_quantile=0.0)
    with pytest.raises(ValueError, match="sampler_logps has shape"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, sampler_logps=sampler[:, :2])
    with pytest.raises(ValueError, match="delta"):
        fused_linear_grpo_loss(hidden, weight, ids, mask, adv, loss_type="sapo", delta=2.0)


def _gemm_count(fn) -> int:
    """The matrix multiplications (aten mm / addmm / bmm and friends) that ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmm_"):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo", "vespo", "gmpo"])
def test_new_loss_types_run_the_same_gemms_as_dapo(loss_type):
    """The loss type only changes the per-token math between the GEMMs: forward + backward run exactly as many
    matrix multiplications as dapo on the same rows (whole-sequence chunks hold the same tokens; here they also
    come out as many chunks)."""
    hidden, weight, ids, mask, adv, old, refp, _ = _problem()

    def run(lt, **kw):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        return lambda: fused_linear_grpo_loss(h, w, ids, mask, adv, old_logps=old, ref_logps=refp, beta=0.05,
                                              loss_type=lt, chunk_size=T, backend="torch", **kw).loss.backward()

    dapo = _gemm_count(run("dapo"))
    assert dapo > 0
    assert _gemm_count(run(loss_type)) == dapo
    assert _gemm_count(run("dapo", off_policy_mask_threshold=0.1, sampler_logps=old)) == dapo
