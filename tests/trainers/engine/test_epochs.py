"""--num-epochs sets the step count from the data size: offline rows per step, or whole rollouts on-policy."""

import json
import os
from types import SimpleNamespace

from ptkernels.cli import main as ptk
from ptkernels.trainers.engine.distributed import DistInfo
from ptkernels.trainers.engine.loop import steps_for_epochs


def test_steps_for_epochs():
    offline = SimpleNamespace(examples=list(range(48)))
    cfg = SimpleNamespace(num_epochs=2.0, batch_size=8, grad_accum=1)
    assert steps_for_epochs(cfg, offline, DistInfo()) == 12
    cfg.num_epochs, cfg.grad_accum = 0.5, 2
    assert steps_for_epochs(cfg, offline, DistInfo()) == 2  # 24 rows, 16 per step: the last step is partial
    rollouts = SimpleNamespace(rows=list(range(10)), steps_per_rollout=4)
    cfg = SimpleNamespace(num_epochs=1.0, prompts_per_step=4, dynamic_sampling=False)
    assert steps_for_epochs(cfg, rollouts, DistInfo()) == 3 * 4  # ceil(10 / 4) rollouts of 4 steps


def test_sft_num_epochs(data_dir, tmp_path):
    out = str(tmp_path / "sft")
    assert ptk(["sft", "--model", "tiny", "--data", data_dir["sft"], "--output-dir", out, "--num-epochs", "0.5",
                "--batch-size", "8", "--max-length", "48", "--no-progress"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]  # 48 rows, half an epoch, 8 per step
