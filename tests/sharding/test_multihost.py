"""Two CPU processes x 4 devices on localhost (``jax.distributed``, gloo collectives): each restores its shards of
a converted checkpoint under the 2 x 4 ``fsdp_tp`` plan (the ``fsdp`` axis spans the two processes), generates,
and only process 0 reports. The tokens equal a single-process, unsharded run of the same checkpoint, from one
static batch and from continuous batching over two slots (one per process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import llama32_jax as lj
from tests.sharding.test_sharding import TEXT, _params

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 300, 9, 41], [44, 2, 13], [7, 7, 7, 7, 7, 7, 7], [1, 2]]
NEW = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    model = lj.load_params(TEXT, _params(TEXT), param_dtype=jnp.float32)
    lj.export_hf(model, root / "hf", dtype="float32")
    return lj.convert(root / "hf", root / "orbax", dtype="float32", progress=False)


def test_two_processes_generate_once(checkpoint, tmp_path):
    reference = lj.load(checkpoint, dtype="float32").generate(PROMPTS, max_new_tokens=NEW, return_details=True)
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    port = _free_port()
    out = tmp_path / "result.json"
    procs = []
    for pid in range(2):
        cmd = [
            sys.executable, "-m", "experiments.multihost_generate", f"--coordinator=localhost:{port}",
            "--num_processes=2", f"--process_id={pid}", f"--checkpoint={checkpoint}", "--plan=fsdp_tp",
            f"--prompt_ids={json.dumps(PROMPTS)}", f"--max_new_tokens={NEW}", "--dtype=float32", f"--out={out}",
            "--slots=2",  # 4 prompts > 2 slots: continuous batching too, one slot per fsdp (cross-process) shard
        ]  # fmt: skip
        log = open(tmp_path / f"p{pid}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=420) for p, _ in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = [(tmp_path / f"p{pid}.log").read_text() for pid in range(2)]
    assert codes == [0, 0], "\n\n".join(
        f"--- process {i} (exit {codes}):\n{text[-3000:]}" for i, text in enumerate(logs)
    )
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and result["devices"] == 8
    assert [o["tokens"] for o in result["outputs"]] == [r.tokens for r in reference]
    assert [o["tokens"] for o in result["engine_outputs"]] == [r.tokens for r in reference]
    # Reported once: process 0 printed the result, process 1 did not.
    assert '"outputs"' in logs[0] and '"outputs"' not in logs[1]
    assert np.all([len(o["tokens"]) == NEW for o in result["outputs"]])
