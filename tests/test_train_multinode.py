"""Training across machines, on one machine: two torchrun launchers, each a node of one rank (--nnodes 2, c10d
rendezvous on loopback, gloo on CPU), train as one launcher with two ranks does, and the model is saved once.

The single-node run is `torchrun --nproc_per_node 2` with the same per-device batch and accumulation: the same
world size, so the same data shard per global rank, the same micro-batches and the same DDP gradient average. The
only difference is that the two ranks meet through a rendezvous across launchers, which is what is under test, so
losses, gradient norms and saved weights must agree to float rounding, under either --loss_normalization.
(One rank with doubled accumulation would also regroup the sequences into other micro-batches: tests/test_train_ddp.py
ties 2 ranks to 1 rank already.)"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.test_train_ddp import ENV, torchrun
from tests.test_train_dpo import make_pairs
from tests.test_train_sft import sft_records

GLOBAL_BATCH = 4
NODES = 2
SAVED = "saved the model, tokenizer and chat template name"
# gloo picks its interface from the hostname otherwise; across machines this names the private network's interface
NODE_ENV = {**ENV, "GLOO_SOCKET_IFNAME": "lo"}
NODE_TIMEOUT_S = 240


def launch_node(node_rank: int, endpoint: str, module: str, model: Path, data: Path, out: Path, log: Path,
                *extra: str) -> subprocess.Popen:
    """One node's launcher with one rank. The trainer flags are test_train_ddp.torchrun's, per-device batch
    GLOBAL_BATCH // NODES."""
    cmd = ["torchrun", f"--nnodes={NODES}", "--nproc_per_node=1", f"--node_rank={node_rank}",
           "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=multinode-test", "-m", module,
           "--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
           "--per_device_train_batch_size", str(GLOBAL_BATCH // NODES), "--gradient_accumulation_steps", "1",
           "--logging_steps", "1", "--seed", "0", *extra]
    with open(log, "w") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=NODE_ENV)


def stop_node(launcher: subprocess.Popen) -> None:
    """SIGTERM, which torchrun passes on to its trainer (a trainer left behind could wait in a collective for half
    an hour), then SIGKILL."""
    launcher.terminate()
    try:
        launcher.wait(timeout=45)  # torchrun gives its trainer 30 s after SIGTERM, then kills it
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()


def run_two_nodes(module: str, model: Path, data: Path, out: Path, *extra: str) -> tuple[list[dict], list[str]]:
    """Both nodes' launchers on one rendezvous endpoint; (rank 0's loss log, each node's output). A node that fails
    stops the other at once (its rank could wait in a collective for the dead one), and so does the deadline."""
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [out.parent / f"{out.name}.node{rank}.log" for rank in range(NODES)]
    nodes = [launch_node(rank, endpoint, module, model, data, out, logs[rank], *extra) for rank in range(NODES)]
    deadline, timed_out = time.monotonic() + NODE_TIMEOUT_S, False
    try:
        while None in (codes := [node.poll() for node in nodes]) and not any(codes):  # running, none failed
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for node in nodes:
            if node.poll() is None:
                stop_node(node)
    outputs = [log.read_text() for log in logs]
    report = "\n".join(f"node {rank} ({'stopped by the test' if code is None else f'exit {code}'}):\n"
                       f"{outputs[rank][-2000:]}" for rank, code in enumerate(codes))
    assert not timed_out, f"the nodes did not finish within {NODE_TIMEOUT_S} s\n{report}"
    assert codes == [0] * NODES, report
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h], outputs


def assert_same_training(one: list[dict], two: list[dict], one_dir: Path, two_dir: Path, keys: tuple[str, ...]):
    """The same steps, logged values within 1e-6 relative (the launches differ in no arithmetic: in practice they
    agree exactly), and the same saved weights."""
    assert [h["step"] for h in two] == [h["step"] for h in one] == [1, 2, 3, 4]  # the data is split, not repeated
    for a, b in zip(one, two):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key, a[key], b[key])
    weights_one, weights_two = (load_file(d / "model.safetensors") for d in (one_dir, two_dir))
    assert weights_one.keys() == weights_two.keys()
    assert max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one) <= 1e-6


def assert_saved_once(node_outputs: list[str]):
    """Global rank 0 saves; which node holds it is the rendezvous' choice (c10d ignores --node_rank)."""
    assert sum(output.count(SAVED) for output in node_outputs) == 1


@pytest.mark.slow
def test_sft_on_two_nodes_matches_one_node(tiny_model_dir, tmp_path):
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(sft_records(8)))
    flags = ("--model_max_length", "96", "--num_train_epochs", "2", "--learning_rate", "3e-3")
    _, one = torchrun(2, "fastchat.train.train", tiny_model_dir, data, tmp_path / "one", GLOBAL_BATCH, *flags)
    two, outputs = run_two_nodes("fastchat.train.train", tiny_model_dir, data, tmp_path / "two", *flags)
    assert_same_training(one, two, tmp_path / "one", tmp_path / "two", ("loss", "grad_norm"))
    assert one[-1]["loss"] < one[0]["loss"]  # it learned
    assert_saved_once(outputs)


@pytest.mark.slow
def test_dpo_on_two_nodes_matches_one_node(tiny_model_dir, tmp_path):
    """--precompute_ref_logps across nodes: each rank gets the reference values of its own pairs."""
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(make_pairs(8)))
    flags = ("--model_max_length", "128", "--num_train_epochs", "2", "--learning_rate", "2e-3", "--beta", "0.1",
             "--precompute_ref_logps")
    _, one = torchrun(2, "fastchat.train.train_dpo", tiny_model_dir, data, tmp_path / "one", GLOBAL_BATCH, *flags)
    two, outputs = run_two_nodes("fastchat.train.train_dpo", tiny_model_dir, data, tmp_path / "two", *flags)
    assert_same_training(one, two, tmp_path / "one", tmp_path / "two",
                         ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "rewards/rejected"))
    assert_saved_once(outputs)
