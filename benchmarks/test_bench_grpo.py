"""Fused linear GRPO loss, forward + backward (gradients of hidden and weight), beside eager and Liger-Kernel.

One case = one GRPO micro-batch of B completions x T tokens (right-padded: lengths uniform in [T/2, T], so about
25% of the positions are padding) from hidden states ``[B, T, D]`` and a head ``[V, D]``, with TRL's default
loss_type "dapo", token-level importance sampling, old log-probs given (num_iterations > 1) and a k3 KL term to
given reference log-probs (beta = 0.04):

    eager          TRL's ``_compute_loss`` path: full logits ``F.linear`` (upcast to fp32, / temperature),
                   ``log_softmax`` + ``gather``, then the TRL-literal loss (``ptkernels.reference.rl.grpo_loss``)
    liger          Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (when installed; ``compiled=False`` on CPU)
    ptk-<backend>  ``fused_linear_grpo_loss`` on each usable backend except "reference" and the Triton interpreter
    ptk-<backend>+compact  ``memory="compact"`` on the device's default backend (triton on CUDA, native on CPU):
                   dW one vocabulary block at a time in backward, no fp32 [V, D] accumulator; its peak memory
                   against ``grad_floor_bytes`` (dX + dW in the inputs' dtype) is ``mem_x_grad_floor``

Sizes (benchmarks/README.md): CPU 8 x T=512, D=512, V=32000, fp32; GPU 8 x T=1024, D=4096, V=128256, bf16;
``PTK_BENCH_SMALL=1`` a smoke size. ``extra_info`` as in test_bench_linear_cross_entropy.py: median, peak memory
(CUDA max_memory_allocated growth; CPU peak RSS growth of a fresh subprocess), useful TFLOP/s over
6 * N_valid * D * V, time / floor, and ``time_x_eager`` / ``mem_x_eager`` measured in this run. Times are never
asserted; each case checks its loss and hidden-state gradient against eager.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from _measure import cuda_peak_growth, peak_rss_growth, sync, useful_flops
from conftest import DEVICE, SESSION_RESULTS, bench_rounds, bench_size

import ptkernels
from ptkernels.ops.core.dispatch import triton_interpreting, unusable_reason
from ptkernels.ops.grpo import group_advantages
from ptkernels.reference import rl as ref_rl

try:  # exported from the package root once wired up; the op module otherwise
    from ptkernels import fused_linear_grpo_loss
except ImportError:
    from ptkernels.ops.fused_grpo import fused_linear_grpo_loss

OP = "fused_linear_grpo_loss"
PTK_BACKENDS = ("torch", "triton", "native")
COMPACT_IMPLS = ("ptk-triton+compact", "ptk-native+compact")  # memory="compact" on each device's default backend
IMPLS = ("eager", "liger") + tuple(f"ptk-{b}" for b in PTK_BACKENDS) + COMPACT_IMPLS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BETA, EPS_LOW, EPS_HIGH, LOSS_TYPE, GROUP = 0.04, 0.2, 0.28, "dapo", 4


def grpo_size() -> dict:
    """B, T, D, V, dtype for this device (benchmarks/README.md: GRPO 8 x T)."""
    size = bench_size()
    if size.name.startswith("smoke"):
        return {"b": 4, "t": 64, "d": 64, "v": 2048, "dtype": "float32" if DEVICE.type == "cpu" else "bfloat16"}
    if DEVICE.type == "cuda":
        return {"b": 8, "t": 1024, "d": 4096, "v": 128256, "dtype": "bfloat16"}
    return {"b": 8, "t": 512, "d": 512, "v": 32000, "dtype": "float32"}


def size_name(s: dict) -> str:
    return f"B{s['b']}xT{s['t']}-D{s['d']}-V{s['v']}-{s['dtype']}"


class Problem:
    """hidden [B, T, D] and weight [V, D] (leaves requiring grad), completion ids and a right-padded mask,
    group-relative advantages, and old / reference log-probs near the current ones."""

    def __init__(self, b: int, t: int, d: int, v: int, dtype, device, seed: int = 0):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        device = torch.device(device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.hidden = torch.randn(b, t, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
        self.weight = (torch.randn(v, d, generator=g) * d ** -0.5).to(device=device, dtype=dtype).requires_grad_()
        self.ids = torch.randint(0, v, (b, t), generator=g).to(device)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        self.mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64).to(device)
        self.n_valid = int(lengths.sum())
        rewards = torch.randn(b, generator=g)
        self.advantages = group_advantages(rewards, group_size=min(GROUP, b)).to(device)
        with torch.no_grad():
            logp = ptkernels.linear_token_logprobs(self.hidden, self.weight, self.ids, backend="torch").float()
        self.old_logps = (logp + 0.05 * torch.randn(b, t, generator=g).to(device)).contiguous()
        self.ref_logps = (logp + 0.05 * torch.randn(b, t, generator=g).to(device)).contiguous()
        self.device = device

    def reset_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def _liger_loss(p: Problem):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=BETA, compiled=p.device.type == "cuda", use_ref_model=True,
                                    epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type=LOSS_TYPE,
                                    max_completion_length=p.ids.shape[1], temperature=1.0)


def _objective(impl: str, p: Problem):
    """A zero-argument function returning the scalar loss that backward runs from."""
    h, w, ids, mask, adv = p.hidden, p.weight, p.ids, p.mask, p.advantages
    kw = dict(old_logps=p.old_logps, ref_logps=p.ref_logps, beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
              loss_type=LOSS_TYPE)
    if impl.startswith("ptk-"):
        backend, _, variant = impl[4:].partition("+")
        memory = "compact" if variant == "compact" else "default"
        return lambda: fused_linear_grpo_loss(h, w, ids, mask, adv, backend=backend, memory=memory, **kw).loss
    if impl == "eager":
        def eager():
            logits = F.linear(h, w).float()  # TRL: model(...).logits, upcast, / temperature (1.0)
            logps = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            return ref_rl.grpo_loss(logps, p.old_logps, adv, mask, ref_logps=p.ref_logps, beta=BETA,
                                    epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type=LOSS_TYPE).loss

        return eager
    if impl == "liger":
        loss_fn = _liger_loss(p)

        def liger():
            out = loss_fn(h, w, ids, mask, adv, ref_per_token_logps=p.ref_logps, old_per_token_logps=p.old_logps)
            return out[0] if isinstance(out, tuple) else out

        return liger
    raise ValueError(f"unknown impl {impl!r}")


def make_step(impl: str, p: Problem):
    objective = _objective(impl, p)

    def step():
        out = objective()
        out.backward()
        sync(p.device)
        return out.detach()

    return step


def memory_case(impl: str, b: int, t: int, d: int, v: int, dtype: str, device: str = "cpu"):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(impl, Problem(b, t, d, v, dtype, device))


def skip_reason(impl: str, device: torch.device) -> str | None:
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        return None
    if impl.startswith("ptk-"):
        backend, _, variant = impl[4:].partition("+")
        if variant == "compact" and backend != ("triton" if device.type == "cuda" else "native"):
            return "memory='compact' is measured on the device's default backend only"
        reason = unusable_reason(backend, device)
        if reason is not None:
            return f"ptkernels backend {backend!r} not usable: {reason}"
        if backend == "triton" and device.type == "cpu" and triton_interpreting():
            return "the Triton interpreter (TRITON_INTERPRET=1) is never benchmarked"
    return None


@pytest.fixture(scope="module")
def grpo_problem(device) -> Problem:
    return Problem(**grpo_size(), device=device)


_REFERENCE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def reference(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    if "eager" not in _REFERENCE:
        p.reset_grads()
        out = make_step("eager", p)()
        _REFERENCE["eager"] = (out.float(), p.hidden.grad.float().clone())
        p.reset_grads()
    return _REFERENCE["eager"]


def _peak_memory(impl: str, p: Problem, device) -> tuple[float, str]:
    if device.type == "cuda":
        return cuda_peak_growth(make_step(impl, p), device, reset=p.reset_grads), \
            "cuda max_memory_allocated - baseline"
    s = grpo_size()
    warm = {"b": 2, "t": 16, "d": 32, "v": 256, "dtype": s["dtype"]}
    r = peak_rss_growth(__file__, "memory_case", kwargs={"impl": impl, **s},
                        warmup_kwargs={"impl": impl, **warm})
    return float(r["growth_bytes"]), "cpu peak RSS growth (VmHWM - VmRSS) of a fresh subprocess"


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_fwd_bwd(benchmark, impl, grpo_problem, device, matmul_rate):
    reason = skip_reason(impl, device)
    if reason:
        pytest.skip(reason)
    p = grpo_problem
    s = grpo_size()
    reference(p)  # the oracle first, outside the timed rounds
    benchmark.group = f"{OP} fwd+bwd {size_name(s)}"
    out = benchmark.pedantic(make_step(impl, p), setup=p.reset_grads, rounds=bench_rounds(), iterations=1,
                             warmup_rounds=1)
    dh = p.hidden.grad.float().clone()
    ref_out, ref_dh = reference(p)
    tol = 2e-4 if s["dtype"] == "float32" else 2e-2
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol, msg=lambda m: f"{impl}: {m}")
    err = (dh - ref_dh).norm() / ref_dh.norm().clamp_min(1e-30)
    assert err < (1e-4 if s["dtype"] == "float32" else 3e-2), f"{impl}: d hidden rel. error {err:.3g}"

    stats = getattr(benchmark, "stats", None)
    median = float(stats.stats.median) if stats is not None else None
    flops = useful_flops(p.n_valid, s["d"], s["v"])
    floor_s = matmul_rate.floor_seconds(flops)
    mem, mem_how = _peak_memory(impl, p, device)
    grad_floor = (p.hidden.numel() + p.weight.numel()) * p.hidden.element_size()  # dX + dW
    info = {
        "op": OP, "impl": impl, "size": size_name(s), "dtype": s["dtype"], "b": s["b"], "t": s["t"],
        "n_valid": p.n_valid, "d": s["d"], "v": s["v"], "loss_type": LOSS_TYPE, "beta": BETA,
        "median_s": median, "useful_flops": flops,
        "useful_tflops": flops / median / 1e12 if median else None,
        "floor_s": floor_s, "time_over_floor": median / floor_s if median else None,
        "peak_mem_bytes": mem, "peak_mem_mib": mem / 2 ** 20, "peak_mem_method": mem_how,
        "grad_floor_bytes": grad_floor, "mem_x_grad_floor": mem / grad_floor, **matmul_rate.as_info(),
    }
    base = SESSION_RESULTS.get((OP, "eager"))
    if base and median and base.get("median_s"):
        info["time_x_eager"] = median / base["median_s"]
        info["mem_x_eager"] = mem / base["peak_mem_bytes"] if base["peak_mem_bytes"] else None
    benchmark.extra_info.update(info)
    SESSION_RESULTS[(OP, impl)] = info
    p.reset_grads()


# ------------------------------------------------------------------------------- loss types (TRL 1.16 + GMPO)

LOSS_TYPES = ("dapo", "cispo", "sapo", "luspo", "vespo", "gmpo", "clip_cov", "kl_cov")
COV_TYPES = ("clip_cov", "kl_cov")  # verl's: their token selection adds one no-grad forward GEMM pass


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_types_fwd_bwd(benchmark, loss_type, grpo_problem, device):
    """Every GRPO loss type through the fused op on the default backend: the same three GEMMs as dapo (the loss
    type only changes the per-token math between them), so the time should match dapo's. ``time_x_dapo`` is
    measured in this run. Checked against the eager path of the same loss type."""
    p = grpo_problem
    s = grpo_size()
    kw = dict(old_logps=p.old_logps, ref_logps=p.ref_logps, beta=BETA, epsilon_low=EPS_LOW,
              epsilon_high=5.0 if loss_type == "cispo" else EPS_HIGH, loss_type=loss_type)

    def seeded() -> dict:  # Clip-Cov's random choice of tokens: the same in every round and in the check
        return {"generator": torch.Generator(device=p.device).manual_seed(0)} if loss_type in COV_TYPES else {}

    def step():
        out = fused_linear_grpo_loss(p.hidden, p.weight, p.ids, p.mask, p.advantages, **kw, **seeded()).loss
        out.backward()
        sync(p.device)
        return out.detach()

    benchmark.group = f"{OP} loss types fwd+bwd {size_name(s)}"
    out = benchmark.pedantic(step, setup=p.reset_grads, rounds=bench_rounds(), iterations=1, warmup_rounds=1)
    with torch.no_grad():
        logps = torch.log_softmax(F.linear(p.hidden, p.weight).float(), dim=-1).gather(
            -1, p.ids.unsqueeze(-1)).squeeze(-1)
        opts = {k: v for k, v in kw.items() if k != "old_logps"}
        truth = ref_rl.grpo_loss(logps, p.old_logps, p.advantages, p.mask, **opts, **seeded()).loss
    tol = 2e-4 if s["dtype"] == "float32" else 2e-2
    torch.testing.assert_close(out.float(), truth.float(), rtol=tol, atol=tol)
    stats = getattr(benchmark, "stats", None)
    median = float(stats.stats.median) if stats is not None else None
    info = {"op": OP, "impl": "ptk-auto", "size": size_name(s), "loss_type": loss_type, "median_s": median}
    base = SESSION_RESULTS.get((OP, "loss_type=dapo"))
    if base and median and base.get("median_s"):
        info["time_x_dapo"] = median / base["median_s"]
    benchmark.extra_info.update(info)
    SESSION_RESULTS[(OP, f"loss_type={loss_type}")] = info
    p.reset_grads()
