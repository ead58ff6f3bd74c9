"""Two processes (gloo, CPU) train exactly as one process on the same global batch: the contrastive loss gathers the
features of all processes with gradients, and DDP averages gradients that are already the global batch's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_contrastive_worker.py"


def _launch(processes, out):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu starts several processes only through MPI; --multi_gpu starts them with torch's launcher,
    # and the worker's TrainingArguments(use_cpu=True) makes them a gloo group on the CPU
    mode = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "losses.json").read_text()), load_file(out / "trainable.safetensors")


@pytest.mark.slow
def test_two_processes_train_as_one_on_the_global_batch(tmp_path):
    (one, one_weights), (two, two_weights) = (_launch(n, tmp_path / str(n)) for n in (1, 2))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert abs(two["losses"][0] - one["losses"][0]) <= 1e-6, (one["losses"], two["losses"])
    assert one["losses"][2] < one["losses"][0], one["losses"]                    # it learns
    assert one_weights.keys() == two_weights.keys() and "text_projection.weight" in one_weights
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], atol=1e-5, rtol=0, msg=name)
