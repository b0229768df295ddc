"""Two "nodes" on this machine: two ``torchrun --nnodes 2 --node_rank 0/1 --nproc_per_node 1`` launches
(static rendezvous at ``127.0.0.1:PORT``, gloo, ``ACCELERATE_USE_CPU=1``) train the toy model as one job
and match one process at the same global batch (2 x 2 vs 1 x 4): the first step's all-reduced
gradients, every step's loss and the final weights. The worker is tests/test_distributed.py's.
Commands for real clusters: docs/scale/multinode.md.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_distributed import RUN_FLAGS, one_process_reference  # noqa: E402
from test_trainer import REPO  # noqa: E402

from genmod.train import load_weights, read_metrics  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_distributed.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_node(node_rank: int, port: int, out) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
           "--nproc_per_node", "1", "--rdzv_backend", "static", "--master_addr", "127.0.0.1", "--master_port", str(port),
           WORKER, str(out), *RUN_FLAGS, "--batch_size", "2", "--output_dir", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_two_nodes(out, timeout=240) -> None:
    port = _free_port()
    nodes = [_launch_node(rank, port, out) for rank in (0, 1)]
    try:
        results = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:  # a hung rendezvous must not outlive the test
            if node.poll() is None:
                node.kill()
                node.communicate()
    for rank, (node, (_, stderr)) in enumerate(zip(nodes, results)):
        assert node.returncode == 0, f"node {rank}: {stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_match_one_process_at_same_global_batch(tmp_path):
    nodes, one = tmp_path / "nodes", tmp_path / "one"
    _run_two_nodes(nodes)

    single = one_process_reference(tmp_path, one)
    for rank in range(2):  # the node's single process has global rank = node rank
        grads = load_weights(str(nodes / f"rank{rank}"))
        for key in single:
            torch.testing.assert_close(grads[key], single[key], rtol=0, atol=1e-6)
    assert [m["loss"] for m in read_metrics(nodes)] == pytest.approx([m["loss"] for m in read_metrics(one)], abs=1e-6)
    final = [load_weights(str(nodes / f"params{rank}")) for rank in range(2)]
    reference = load_weights(str(one / "checkpoints" / "step-00000003" / "model"))
    for key in reference:
        assert torch.equal(final[0][key], final[1][key])  # both nodes hold the same weights
        torch.testing.assert_close(final[0][key], reference[key], rtol=0, atol=1e-6)
