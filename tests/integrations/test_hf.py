"""Hugging Face integration: the fused loss equals model(..., labels=labels).loss, without building logits.

Tiny random models built from configs (nothing downloaded), float32, backend="torch".
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers")

import ptkernels as ptk  # noqa: E402
from ptkernels.integrations import (  # noqa: E402
    causal_lm_hidden_states,
    causal_lm_loss,
    output_head,
    patch_model_for_fused_loss,
)

V, B, T = 97, 3, 16
# initializer_range 0.2: logits of order 1, so a softcap or scale that were applied wrongly would show.
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "llama_tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "gemma2_softcap": lambda: transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=1.0),
    "cohere_logit_scale": lambda: transformers.CohereConfig(**COMMON, logit_scale=0.25),
    "granite_logits_scaling": lambda: transformers.GraniteConfig(**COMMON, logits_scaling=4.0),
    "phi_head_bias": lambda: transformers.PhiConfig(**COMMON),
    "mixtral_aux_loss": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                           output_router_logits=True),
}


def tiny(name="llama"):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def batch(seed=0):
    """Right-padded rows with prompt tokens masked: labels -100 on the prompt and on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    mask[2, -2:] = 0
    ids[mask == 0] = COMMON["pad_token_id"]
    labels = ids.clone()
    labels[:, :4] = -100
    labels[0, :9] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(ref, ours):
    (ref_loss, ref_grads), (loss, grads) = ref, ours
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()  # every parameter, the tied or untied head included
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("num_items", [None, 23])
def test_loss_and_grads_match_transformers(name, num_items):
    model = tiny(name)
    ids, mask, labels = batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref = loss_and_grads(model, lambda: model(ids, attention_mask=mask, labels=labels, **kw).loss)
    ours = loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels, mask, backend="torch", **kw))
    assert_same_loss_and_grads(ref, ours)


def test_output_head_reads_softcap_and_scales():
    assert output_head(tiny("gemma2_softcap")).softcap == 1.0
    assert output_head(tiny("cohere_logit_scale")).temperature == 4.0  # logits * 0.25
    assert output_head(tiny("granite_logits_scaling")).temperature == 4.0  # logits / 4
    model = tiny("llama_tied")
    head = output_head(model)
    assert head.weight is model.get_input_embeddings().weight and head.softcap is None and head.temperature == 1.0
    assert output_head(tiny("phi_head_bias")).bias is not None


def test_hidden_states_with_public_op():
    """The documented manual path: hidden states + output_head + ptk.linear_cross_entropy(shift=True)."""
    model = tiny("gemma2_softcap")
    ids, mask, labels = batch()
    hidden = causal_lm_hidden_states(model, ids, mask)
    torch.testing.assert_close(hidden, model.model(ids, attention_mask=mask).last_hidden_state)
    head = output_head(model)
    loss = ptk.linear_cross_entropy(hidden, head.weight, labels, shift=True, backend="torch", **head.kwargs())
    torch.testing.assert_close(loss, model(ids, attention_mask=mask, labels=labels).loss, rtol=1e-5, atol=1e-6)


def test_shift_labels_and_prepadded_inputs():
    """Pre-shifted labels (padding-free collators) give the same loss as labels."""
    model = tiny()
    ids, mask, labels = batch()
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    ref = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(causal_lm_loss(model, ids, attention_mask=mask, shift_labels=shifted,
                                              backend="torch"), ref)


class _LargestLogits(TorchDispatchMode):
    """Records the most rows of any freshly allocated tensor with V columns (views such as weight.T skipped)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V:
                self.rows = max(self.rows, t.numel() // V)
        return out


def test_logits_are_never_built():
    model = tiny()
    ids, mask, labels = batch()
    widths = []
    model.lm_head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[-1]))
    with _LargestLogits() as hf:
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert hf.rows >= B * T  # the check can see logits: Transformers builds all B*T rows
    for _ in range(2):
        with _LargestLogits() as ours:
            causal_lm_loss(model, ids, labels, mask, chunk_size=8, backend="torch").backward()
        assert ours.rows <= 8  # one chunk of the fused op at a time
    # Transformers' head gave V columns; ours a 6-wide probe on the model's first run (the post-processing
    # check), then nothing.
    assert widths == [V, 6, 0]


class _DoubledLogits(transformers.LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_unknown_post_processing_raises():
    torch.manual_seed(0)
    model = _DoubledLogits(CONFIGS["llama"]())
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="does not reproduce"):
        causal_lm_loss(model, ids, labels, mask, backend="torch")
    assert "forward" not in vars(model.lm_head)  # the head was put back even though the check failed


def test_model_without_head_raises():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="no output head"):
        output_head(transformers.LlamaModel(CONFIGS["llama"]()))


def test_autocast_matches_transformers():
    model = tiny()
    ids, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids, attention_mask=mask, labels=labels).loss
        loss = causal_lm_loss(model, ids, labels, mask, backend="torch")
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)


def test_patch_is_reversible_and_generate_works_after():
    model = tiny()
    ids = batch()[0][:1, :5]
    before = model.generate(ids, max_new_tokens=4, do_sample=False)

    # accelerate keeps its device hooks in the same instance attribute; the patch must put it back.
    def hooked(x, _forward=model.lm_head.forward):
        return _forward(x)

    model.lm_head.forward = hooked
    with patch_model_for_fused_loss(model) as loss_fn:
        assert model(ids).logits.shape[-1] in (0, 6)
        with pytest.raises(RuntimeError, match="already patched"):
            patch_model_for_fused_loss(model)
    assert vars(model.lm_head)["forward"] is hooked
    del model.lm_head.forward
    loss_fn.remove()  # a second remove() is harmless
    assert "forward" not in vars(model.lm_head)
    assert model(ids).logits.shape[-1] == V
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), before)


def test_patched_model_mistakes_say_what_to_do():
    """The two usual mistakes with a patched model: its own loss (Trainer without compute_loss_func passes the
    labels to the model) and generate(); each a RuntimeError naming the fix, and both work again after remove()."""
    model = tiny()
    ids, mask, labels = batch()
    with patch_model_for_fused_loss(model) as loss_fn:
        with pytest.raises(RuntimeError, match="compute_loss_func=loss_fn"):
            model(input_ids=ids, attention_mask=mask, labels=labels)
        with pytest.raises(RuntimeError, match=r"generate\(\) cannot run. Call loss_fn.remove\(\) first"):
            model.generate(ids[:1, :5], max_new_tokens=2, do_sample=False)
        assert torch.isfinite(loss_fn(model(input_ids=ids, attention_mask=mask), labels))
    assert "generate" not in vars(model) and "_loss_function" not in vars(model)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    model.generate(ids[:1, :5], max_new_tokens=2, do_sample=False)


def test_trainer_compute_loss_func_matches_transformers(tmp_path):
    """Two optimizer steps of Trainer (2 micro-batches each: num_items_in_batch matters) give the same losses and
    weights with compute_loss_func=patch_model_for_fused_loss(model) as with the model's own loss."""
    pytest.importorskip("accelerate")
    rows = []
    for seed in range(8):
        ids, mask, labels = batch(seed)
        rows += [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]

    def train(model, name, **kw):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), report_to=[], use_cpu=True, max_steps=2, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
            disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, **kw)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    reference, fused = tiny("llama"), tiny("llama")
    ref_losses = train(reference, "hf")
    calls = []
    with patch_model_for_fused_loss(fused, backend="torch") as loss_fn:
        def counted(outputs, labels, num_items_in_batch=None):
            calls.append(outputs.logits.shape[-1])
            return loss_fn(outputs, labels, num_items_in_batch=num_items_in_batch)

        losses = train(fused, "fused", compute_loss_func=counted)
    assert calls == [6, 0, 0, 0]  # 4 micro-batches; no logits (the probe on the first)
    assert len(losses) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    ids = batch()[0][:1, :5]
    fused.eval()
    reference.eval()
    assert torch.equal(fused.generate(ids, max_new_tokens=4, do_sample=False),
                       reference.generate(ids, max_new_tokens=4, do_sample=False))



def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fused, reference = tiny(), tiny()
        ids, mask, labels = batch(seed=rank)
        ref = torch.nn.parallel.DistributedDataParallel(reference, find_unused_parameters=True)
        ddp = torch.nn.parallel.DistributedDataParallel(fused, find_unused_parameters=True)
        with patch_model_for_fused_loss(fused, backend="torch") as loss_fn:
            for _ in range(2):  # the probe step, then a plain one
                ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
                loss_fn(ddp(input_ids=ids, attention_mask=mask), labels).backward()
        err = max((p.grad - q.grad).abs().max().item() for p, q in zip(fused.parameters(), reference.parameters()))
        (out_dir / f"rank{rank}").write_text(str(err))
        # Teardown order matters (py-spy on a hung run): a Reducer dropping the last reference to the gloo
        # process group joins gloo's worker threads while holding the GIL, and a worker still destroying the
        # backward's last allreduce work needs the GIL to free that work's Python thread-local state: deadlock.
        # So: let every rank's allreduce finish, free the DDP wrappers while the group lives, then destroy it.
        dist.barrier()
        del ddp, ref
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import transformers
def test_ddp_with_find_unused_parameters(tmp_path):
    """Trainer wraps a model in DDP(find_unused_parameters=True) by default. The head is not run in the forward,
    but its empty output stays in the weight's autograd graph, so DDP neither flags the weight as unused nor
    fails with "Expected to mark a variable ready only once"; gradients are all-reduced as usual."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ddp_worker, args=(2, port, tmp_path), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120  # a healthy run takes ~5 s; never let a hang stall CI
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the 2-process gloo run did not finish in 120 s")
    assert max(float((tmp_path / f"rank{r}").read_text()) for r in range(2)) < 1e-5
