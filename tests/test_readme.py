"""README.md keeps a main-job command that runs on a fresh machine, and the test command CI runs."""

import json
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_main_job_runs_on_the_embedded_default(tmp_path):
    command = bash_blocks()[1].strip()
    assert "--dataset synthetic" in command
    subprocess.run(command, shell=True, check=True, cwd=tmp_path, capture_output=True, text=True)
    results = json.loads((tmp_path / "eval-tiny" / "results.json").read_text())
    assert results["dataset"] == "synthetic" and len(results["languages"]) >= 10
    assert set(results["summary"]["r1_mean"]) == {"avg", "avg_en", "std", "range"}
    assert (tmp_path / "eval-tiny" / "results.png").stat().st_size > 0


def test_ci_runs_the_readme_test_command():
    test_command = bash_blocks()[2].strip()
    assert test_command.startswith("python -m pytest")
    assert test_command in (REPO / ".ci" / "run").read_text().splitlines()
