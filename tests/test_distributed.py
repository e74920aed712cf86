"""train_ldm.py and train_ae.py under torchrun: 2 CPU processes (gloo) train like one process on the
same global batch, hold identical weights after every step, write once (rank 0), and resume with
another process count."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_ae
import train_ldm
from tinyldm.training.distributed import World

pytestmark = pytest.mark.slow  # torchrun with two processes

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args, script: str = "train_ldm.py",
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           f"--master_port={free_port()}", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ae_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "first"
    train_ldm.main(["--smoke", "--out", str(out), "--device", "cpu", "--eval_images", "0"])
    return out / "ae" / "autoencoder.pt"


def flags(out, ae_path, *more):
    return ["--smoke", "--out", str(out), "--ae", str(ae_path), "--device", "cpu",
            "--log_every", "1", "--eval_images", "0", *more]


def records(out, key="loss"):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r]


def weights(out):
    return torch.load(out / "ldm.pt", weights_only=True)


def assert_same_weights(a, b, atol=1e-3):
    for k in a["denoiser"]:
        torch.testing.assert_close(a["denoiser"][k].float(), b["denoiser"][k].float(), atol=atol,
                                   rtol=0)


def test_two_processes_train_like_one(tmp_path, ae_path):
    train_ldm.main(flags(tmp_path / "one", ae_path))
    torchrun(2, *flags(tmp_path / "two", ae_path, "--check_replicas", "true"))
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    # one log line per step: only rank 0 writes
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    # both processes hold the same weights after each step
    assert all(r["replica_spread"] == 0.0 for r in two)
    for a, b in zip(one, two, strict=True):  # the global batch's loss, step by step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    ckpt = weights(tmp_path / "two")
    assert ckpt["processes"] == 2 and ckpt["step"] == 6
    assert_same_weights(weights(tmp_path / "one"), ckpt)
    leftovers = [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]
    assert not leftovers  # no half-written checkpoints from a second writer


def test_resume_with_another_number_of_processes(tmp_path, ae_path):
    """3 steps on 2 processes, then 3 more on 1, equal 6 steps on 1: data order and noise are
    functions of the step and the global batch, not of the process count."""
    torchrun(2, *flags(tmp_path / "split", ae_path, "--steps", "3"))
    train_ldm.main(flags(tmp_path / "split", ae_path, "--steps", "6", "--resume"))
    train_ldm.main(flags(tmp_path / "straight", ae_path, "--steps", "6"))
    assert weights(tmp_path / "split")["processes"] == 1
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"))


def test_each_process_takes_every_world_th_item():
    world = World(rank=1, size=3)
    assert world.shard(list(range(9))) == [1, 4, 7] and world.is_main is False
    assert World().shard([1, 2]) == [1, 2] and not World().enabled


def test_torchrun_asks_for_the_autoencoder_first(tmp_path):
    """No process trains a missing first stage while the others wait at a barrier: the run is
    refused, in one line, with the command that trains it."""
    proc = torchrun(2, "--smoke", "--out", str(tmp_path / "run"), "--device", "cpu",
                    "--eval_images", "0", check=False)
    assert proc.returncode != 0 and "error: no --ae: under torchrun" in proc.stderr
    assert "python train_ae.py --preset shapes --out DIR" in proc.stderr
    assert not (tmp_path / "run" / "ae").exists() and not (tmp_path / "run" / "ldm.pt").exists()


def test_autoencoder_two_processes_train_like_one(tmp_path):
    """Before the discriminator starts: the same losses and weights as one process on the global
    batch (the posterior noise and the data order are functions of the step). With the discriminator
    on, the processes still hold identical weights (its gradients and BatchNorm statistics are
    averaged); its BatchNorm sees each process's share only (SyncBatchNorm on GPUs), so there it is
    close, not equal."""
    args = ["--smoke", "--log_every", "1", "--disc_start", "100"]
    train_ae.main([*args, "--out", str(tmp_path / "one")])
    torchrun(2, *args, "--out", str(tmp_path / "two"), script="train_ae.py")
    one, two = records(tmp_path / "one", "rec"), records(tmp_path / "two", "rec")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two, strict=True):
        assert (b["rec"] == pytest.approx(a["rec"], rel=1e-5)
                and b["kl"] == pytest.approx(a["kl"], rel=1e-5))
    a = torch.load(tmp_path / "one" / "autoencoder.pt",
                   weights_only=True)["autoencoder"]["state_dict"]
    b = torch.load(tmp_path / "two" / "autoencoder.pt",
                   weights_only=True)["autoencoder"]["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-3, rtol=0)

    torchrun(2, "--smoke", "--log_every", "1", "--check_replicas", "true",
             "--out", str(tmp_path / "gan"), script="train_ae.py")
    gan = records(tmp_path / "gan", "rec")
    assert any("g_adv" in r for r in gan) and all(r["replica_spread"] == 0.0 for r in gan)


def test_vq_autoencoder_is_refused_under_torchrun(tmp_path):
    proc = torchrun(2, "--smoke", "--regularizer", "vq", "--out", str(tmp_path / "vq"),
                    script="train_ae.py", check=False)
    assert proc.returncode != 0 and "does not train under torchrun" in proc.stdout + proc.stderr


@pytest.mark.parametrize("rank, finalised", [(1, False), (0, True)])
def test_other_ranks_leave_without_finalisation_and_rank_0_exits_normally(rank, finalised):
    code = ("import atexit; from tinyldm.training.distributed import exit_process; "
            "atexit.register(lambda: print('finalised')); "
            f"print('trained', flush=False); exit_process({{'rank': {rank}}})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    # buffered output is flushed first
    assert proc.returncode == 0 and proc.stdout.startswith("trained")
    assert ("finalised" in proc.stdout) == finalised
