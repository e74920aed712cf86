"""The GPU check (.ci/gpu_check) runs only on a machine with a GPU, where a typo would waste GPU
time. Its dry mode parses every benchmark command's flags and collects the tests, on any machine."""

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # dry-runs every stage of .ci/gpu_check in a subprocess

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script: Path, stage: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY": "1", "OUT": str(out)}
    return subprocess.run(["bash", str(script), stage], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("stage", ["1", "2", "3", "4", "5"])
def test_every_stage_parses(stage, tmp_path):
    result = dry_run(ROOT / ".ci" / "gpu_check", stage, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    if stage == "5":  # the reference curves: a whole train_ldm.py run
        assert "would run: python3 train_ldm.py --preset shapes64 --device cuda" in result.stdout
        return
    assert "would run: python3 -m tinyldm.tools.bench --device cuda" in result.stdout
    if stage == "1":
        assert "test_recorded_sampler_on_a_gpu" in result.stdout  # the CUDA tests are collected


def test_a_typo_in_a_stage_fails_the_dry_run(tmp_path):
    script = tmp_path / ".ci" / "gpu_check"
    script.parent.mkdir()
    script.write_text((ROOT / ".ci" / "gpu_check").read_text().replace("--what unet_train",
                                                                       "--what unet_trian"))
    (tmp_path / "tinyldm").symlink_to(ROOT / "tinyldm")
    result = dry_run(script, "2", tmp_path / "out")
    assert (result.returncode != 0
            and "invalid choice: 'unet_trian'" in result.stdout + result.stderr)
