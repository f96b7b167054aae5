"""The vLLM engine's sleep-mode bookkeeping, which vLLM runs on CUDA only (so the CPU suite cannot run it for
real): which of ``vllm.LLM``'s sleep / wake_up / reload calls a rollout and a weight sync make, in order, checked
against a recording stand-in for the ``LLM`` object. The engine's own logic is what is under test here; the
engine itself is run for real in test_vllm_engine.py."""

from __future__ import annotations

import pytest

from ptkernels.trainers.rollout.vllm_engine import VLLMEngine


class RecordingLLM:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", None if tags is None else tuple(tags)))

    def collective_rpc(self, method, kwargs):
        list(kwargs["weights_iterator"])  # the reload consumes the weights
        self.calls.append((method,))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _engine(sleep_level: int) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # the state __init__ sets, without building vllm.LLM
    engine.llm, engine._in_process, engine.sleep_level = RecordingLLM(), True, sleep_level
    engine._asleep, engine._weights_awake, engine._weights_valid = False, True, True
    return engine


def _rollout(engine):
    """What generate does around vLLM's own generate call."""
    engine._wake()
    engine.llm.calls.append(("generate",))
    engine._sleep()


WEIGHTS = [("model.norm.weight", None)]


def test_no_sleep_mode_makes_no_sleep_calls():
    engine = _engine(0)
    _rollout(engine)
    engine.load_weights(WEIGHTS)
    _rollout(engine)
    assert engine.llm.calls == [("generate",), ("reload_weights",), ("reset_prefix_cache",), ("generate",)]


def test_level_1_sleeps_after_each_rollout_and_a_sync_wakes_the_weights_alone():
    engine = _engine(1)
    _rollout(engine)
    engine.load_weights(WEIGHTS)  # an optimizer step later
    _rollout(engine)
    _rollout(engine)  # no sync in between (e.g. --num-iterations 2): everything wakes at once
    assert engine.llm.calls == [
        ("generate",), ("sleep", 1),
        ("wake_up", ("weights",)), ("reload_weights",), ("reset_prefix_cache",),
        ("wake_up", ("kv_cache", "scheduling")), ("generate",), ("sleep", 1),
        ("wake_up", None), ("generate",), ("sleep", 1)]


def test_level_2_needs_a_sync_before_the_next_rollout():
    engine = _engine(2)
    _rollout(engine)
    with pytest.raises(RuntimeError, match="sleep_level=2 drops the engine's weights"):
        engine._wake()
    engine.load_weights(WEIGHTS)
    _rollout(engine)
    assert engine.llm.calls == [
        ("generate",), ("sleep", 2),
        ("wake_up", ("weights",)), ("reload_weights",), ("reset_prefix_cache",),
        ("wake_up", ("kv_cache", "scheduling")), ("generate",), ("sleep", 2)]


def test_sleep_mode_is_refused_without_cuda(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("ptkernels.trainers.rollout.vllm_engine.require_vllm", lambda: None)
    with pytest.raises(ValueError, match="sleep mode needs CUDA"):
        VLLMEngine(str(tmp_path), enable_sleep_mode=True)
