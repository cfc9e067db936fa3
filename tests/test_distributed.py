import json
import os
import subprocess
import sys
from pathlib import Path


def test_ddp_ranks_draw_different_samples_and_train(tmp_path):
    worker = Path(__file__).with_name("_ddp_worker.py")
    out = tmp_path / "result.json"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "init"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # Same seed, same data and same weights on both ranks: only the rank in the
    # seed can make their local RAD gradients differ.
    assert result["local_grads_differ"]
    assert result["params_in_sync"]
    assert result["last_loss"] < 0.5 * result["first_loss"]
