"""The real entry points: every recipe in-process with tiny overrides, one real
`accelerate launch`, and the CLI."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from adaptune import cli
from conftest import DATA, needs_data

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py") if p.stem != "domain_ner")


def _tiny_overrides(model: str, out: Path) -> list[str]:
    return [f"model.name={model}", "model.max_length=32", f"data.data_dir={DATA}",
            "data.max_train_examples=48", "data.max_dev_examples=16", "train.max_steps=3",
            "train.batch_size=8", "train.precision=fp32", "train.num_threads=1",
            f"output_dir={out}"]


@needs_data
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_in_process(recipe, tiny_encoder, tiny_decoder, tmp_path, monkeypatch, capsys):
    overrides = _tiny_overrides(tiny_encoder, tmp_path / "out")
    if recipe.stem == "ner_adalora":  # tiny model: ranks must fit 32-wide layers
        overrides += ["method.rank=4", "method.adalora.init_rank=6"]
    if recipe.stem == "qa_lora":
        overrides[1] = "model.max_length=96"
    if recipe.stem == "summarize_lora":  # a decoder, and a prompt that fits a tiny model
        overrides = _tiny_overrides(tiny_decoder, tmp_path / "out") + [
            "generation.prompt={document} tl;dr:", "generation.max_new_tokens=4",
            "method.rank=4"]
        overrides[1] = "model.max_length=160"  # character tokens: XSum summaries are long
    monkeypatch.setattr(sys, "argv", [str(recipe)] + overrides)
    runpy.run_path(str(recipe), run_name="__main__")
    printed = capsys.readouterr().out
    assert f"outputs: {tmp_path / 'out'}/" in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["optimizer_steps"] == 3
    assert (tmp_path / "out" / "adapter" / "adaptune.json").exists()


@needs_data
def test_domain_ner_recipe_in_process(tiny_encoder, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "bio.txt"
    corpus.write_text("\n".join(f"the drug {i} binds the receptor in tumour cells" for i in
                                 range(40)))
    recipe = ROOT / "recipes" / "domain_ner.py"
    task = [o for o in _tiny_overrides(tiny_encoder, tmp_path / "unused")
            if not o.startswith(("model.name", "output_dir"))]
    monkeypatch.setattr(sys, "argv", [str(recipe), "--model", tiny_encoder, "--corpus",
                                      str(corpus), "--output-dir", str(tmp_path / "d")] + task)
    runpy.run_path(str(recipe), run_name="__main__")
    printed = capsys.readouterr().out
    assert "held-out perplexity" in printed and "bc5cdr dev F1" in printed
    assert json.loads((tmp_path / "d" / "result.json").read_text())["task"]["optimizer_steps"] == 3


def test_recipe_reports_bad_overrides_without_traceback(tiny_encoder, tmp_path, monkeypatch,
                                                        capsys):
    recipe = ROOT / "recipes" / "cls_lora.py"
    monkeypatch.setattr(sys, "argv", [str(recipe), "train.lrr=1"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(recipe), run_name="__main__")
    assert exit_info.value.code == 2
    assert "error: unknown config key train.lrr" in capsys.readouterr().err


@pytest.mark.integration
@needs_data
def test_accelerate_launch_runs_a_recipe(tiny_encoder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTUNE_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "recipes" / "ner_lora.py")] + _tiny_overrides(tiny_encoder, tmp_path / "o")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ner on conll2003" in proc.stdout and "f1_PER" in proc.stdout
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["num_processes"] == 1


def test_cli_zoo_list_and_predict(tiny_encoder, cls_files, tmp_path, capsys):
    assert cli.main(["zoo", "list"]) == 0
    assert "minilm-l6" in capsys.readouterr().out
    train, dev = cls_files
    assert cli.main(["train", f"model.name={tiny_encoder}", "data.dataset=custom",
                     "train.num_threads=1", f"data.train_path={train}", f"data.dev_path={dev}",
                     "train.max_steps=24", "train.eval_every=24", "train.lr=2e-2",
                     "method.name=full", "train.precision=fp32",
                     f"output_dir={tmp_path / 'run'}"]) == 0
    capsys.readouterr()
    texts = ["good fun", "a bore", "great film", "awful mess"]
    assert cli.main(["predict", str(tmp_path / "run" / "adapter"), *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["input"] for row in rows] == texts
    # The CLI prints what the Python API predicts for the same adapter.
    from adaptune import api

    assert [row["prediction"] for row in rows] == \
        api.load(tmp_path / "run" / "adapter").predict(texts)
    assert cli.main(["train", "train.lr=-1"]) == 2
