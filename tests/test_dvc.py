"""`dvc repro` runs extract -> fit@METHOD -> report end to end, offline, with no remote; re-runs only what changed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dvc")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
CODE = ("cache", "stages", "pipeline")


def needs_tools():
    for tool in ("git", "pipeline"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not on PATH")


def run(args, cwd, check=True):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GIT_CONFIG_NOSYSTEM": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if check:
        assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output}"
    return output


def dvc(*args, cwd, check=True):
    return run([sys.executable, "-m", "dvc", *args], cwd, check)


def ran_stages(output):
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_repo(folder, params):
    """A git + dvc repository holding the project's dvc.yaml, its code (the stages' deps) and the given params."""
    folder.mkdir()
    for name in CODE:
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", folder / ".gitignore")
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], folder)
    dvc("init", "-q", cwd=folder)
    for setting, value in (("core.analytics", "false"), ("core.check_update", "false"), ("parsing.list", "append")):
        dvc("config", setting, value, cwd=folder)
    return folder


def project_params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_name_registered_methods_with_their_own_files():
    from cachetune.stages.methods import method_names

    methods = project_params()["fit"]["methods"]
    assert {"linear", "lst", "unipt", "sherl"} <= set(methods)
    for name, entry in methods.items():
        assert name in method_names() and (ROOT / "stages" / "methods" / f"{name}.py").exists(), name
        assert isinstance(entry, dict), f"fit.methods.{name} must be a mapping ({{}} for no overrides)"


def test_project_pipeline_resolves_to_one_fit_per_method(tmp_path):
    needs_tools()
    from dvc.repo import Repo

    repo = make_repo(tmp_path / "repo", project_params())
    with Repo(str(repo)) as dvc_repo:
        commands = {stage.name: stage.cmd for stage in dvc_repo.index.stages}
    methods = list(project_params()["fit"]["methods"])
    baselines = list(project_params()["baseline"]["methods"])
    assert "lora" in baselines
    assert list(commands) == ["extract", *[f"fit@{m}" for m in methods], *[f"baseline@{m}" for m in baselines],
                              "baseline-checkpointing", "sweep", "report"]
    assert re.fullmatch(r"pipeline baseline --method lora --gradient-checkpointing --measure-step --backbone minilm "
                        r"--data movies --max-length 128 .*--max-train-samples 4000 --length-buckets --device auto "
                        r"--precision auto --out artifacts/models/lora-checkpointing", commands["baseline-checkpointing"])
    assert commands["sweep"].startswith("pipeline sweep --grid params.yaml --cache artifacts/features.zarr "
                                        "--out artifacts/models/sweep --epochs 5")
    assert "--max-train-samples 4000 --length-buckets" in commands["sweep"]
    assert commands["extract"].startswith("pipeline extract --backbone minilm --data movies --layers all "
                                          "--max-length 128 --batch-size 32 --out artifacts/features.zarr")
    assert re.fullmatch(r"pipeline fit --method sherl .*--epochs 5 --batch-size 32 --lr 0\.001 .*--device auto --precision auto ?", commands["fit@sherl"])
    assert re.fullmatch(r"pipeline fit --method lst .*--set r=4", commands["fit@lst"])
    assert commands["fit@unipt"].endswith("--set r=2") and commands["fit@linear"].rstrip().endswith(
        "--seed 0 --max-train-samples 4000 --length-buckets --device auto --precision auto")
    # LoRA on the fits' data: extract's backbone, data and max length; fit's batch size, seed and subset
    assert re.fullmatch(r"pipeline baseline --method lora --backbone minilm --data movies --max-length 128 --epochs 2 "
                        r"--batch-size 32 .*--seed 0 --max-train-samples 4000 --length-buckets --device auto --precision auto "
                        r"--out artifacts/models/lora ?", commands["baseline@lora"])
    assert commands["report"] == "pipeline report --models artifacts/models --out reports"


def test_dvc_repro_end_to_end_then_no_op_then_only_the_changed_fit(tiny_bert, tiny_table, tmp_path):
    needs_tools()
    params = project_params()
    params["extract"].update({"backbone": str(tiny_bert), "data": str(tiny_table), "max-length": 24, "batch-size": 8})
    params["fit"].update({"epochs": 1, "batch-size": 16})
    params["baseline"].update({"epochs": 1})
    params["fit"]["methods"] = {"linear": {}, "sherl": {"set": ["r=4", "late_layers=1"]}}
    params["sweep"] = {"methods": ["linear"], "lr": [0.001, 0.003], "seeds": [0]}
    repo = make_repo(tmp_path / "repo", params)

    first = dvc("repro", cwd=repo)
    assert ran_stages(first) == {"extract", "fit@linear", "fit@sherl", "baseline@lora", "baseline-checkpointing",
                                 "sweep", "report"}, first
    for name in ("linear", "sherl", "lora"):
        metrics = json.loads((repo / "artifacts" / "models" / name / "metrics.json").read_text())
        assert metrics["method"] == name and metrics["settings"]["epochs"] == 1 and len(metrics["history"]) == 1
    assert "--set r=4 --set late_layers=1" in first
    report = (repo / "reports" / "report.md").read_text()
    assert "| linear |" in report and "| sherl |" in report and "| **lora** |" in report
    assert "memory / LoRA (checkpointing)" in report and "| lora-checkpointing | (LoRA's) |" in report
    checkpointed = json.loads((repo / "artifacts" / "models" / "lora-checkpointing" / "metrics.json").read_text())
    assert checkpointed["gradient_checkpointing"] and checkpointed["measured_step_only"]
    assert 0 < checkpointed["training_memory_mb"] and checkpointed["history"] == []
    assert "## Sweep `sweep`" in report and "| linear-lr=0.003 | 1 |" in report
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"extract", "fit@linear", "fit@sherl", "baseline@lora", "baseline-checkpointing", "sweep", "report"}

    second = dvc("repro", cwd=repo)
    assert ran_stages(second) == set() and "Data and pipelines are up to date" in second, second

    plots = json.loads(dvc("plots", "show", "--json", cwd=repo))
    assert not plots.get("errors"), plots["errors"]
    assert {"reports/history/linear.csv", "reports/history/sherl.csv"} <= set(plots["data"])
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=repo))
    assert "artifacts/models/sherl/metrics.json" in json.dumps(metrics)

    params["fit"]["methods"]["sherl"]["lr"] = 0.01
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc("repro", cwd=repo)
    assert ran_stages(third) == {"fit@sherl", "report"}, third
    sherl = json.loads((repo / "artifacts" / "models" / "sherl" / "metrics.json").read_text())
    linear = json.loads((repo / "artifacts" / "models" / "linear" / "metrics.json").read_text())
    assert sherl["settings"]["lr"] == 0.01 and linear["settings"]["lr"] == 0.001

    params["sweep"]["lr"] = [0.001, 0.003, 0.01]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = dvc("repro", cwd=repo)
    assert ran_stages(fourth) == {"sweep", "report"}, fourth
    assert "3 runs (1 trained now)" in fourth  # the two finished runs are kept, not retrained
