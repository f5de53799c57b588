"""`qtune eval eval.lm_eval.tasks=[...]`: EleutherAI's lm-eval on the models qtune eval loads, with a task of the test's
own (a yaml and a jsonl in tmp, read offline through eval.lm_eval.include_path); the scores in the same report."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import only_line, qtune, qtune_warm

QUESTIONS = [("The sky on a clear day is", ["blue", "green"], 0), ("Two plus two is", ["five", "four"], 1),
             ("Fire is", ["cold", "hot"], 1), ("Ice is", ["cold", "hot"], 0), ("A cat says", ["meow", "woof"], 0)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "tiny_qa.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                                  for q, c, a in QUESTIONS))
    (folder / "tiny_qa.yaml").write_text(f"""task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'tiny_qa.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return folder


def test_a_local_task_scores_base_adapter_and_merged_in_the_same_report(tiny_run, tiny_qwen3, tasks, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_qwen3, run / "merged")  # a complete model folder, as `qtune merge` leaves one: the base's weights
    out = tmp_path / "eval"
    p = qtune("eval", f"run={run}", "eval.models=[base,adapter,merged]", "eval.max_eval_rows=2", f"eval.output_dir={out}",
              "eval.lm_eval.tasks=[tiny_qa]", f"eval.lm_eval.include_path={tasks}", "eval.lm_eval.limit=4",
              "eval.lm_eval.num_fewshot=1", cwd=tmp_path, env={"HF_DATASETS_CACHE": str(tmp_path / "datasets")})
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    models = summary["models"]
    for name in ("base", "adapter", "merged"):
        acc = models[name]["lm_eval/tiny_qa/acc"]
        assert acc in (0.0, 0.25, 0.5, 0.75, 1.0), models[name]   # eval.lm_eval.limit=4: four questions scored
        assert models[name]["heldout_loss"] is not None               # beside qtune's own figures
    assert summary["settings"]["lm_eval"] == {"tasks": ["tiny_qa"], "include_path": str(tasks), "limit": 4,
                                              "num_fewshot": 1}
    assert models["merged"]["lm_eval/tiny_qa/acc"] == models["base"]["lm_eval/tiny_qa/acc"]  # the same weights
    report = (out / "report.md").read_text()
    row = f"| tiny_qa acc (lm-eval) | {models['base']['lm_eval/tiny_qa/acc']:.4f} | " \
          f"{models['adapter']['lm_eval/tiny_qa/acc']:.4f} | {models['merged']['lm_eval/tiny_qa/acc']:.4f} |"
    assert row in report, report
    assert "tiny_qa acc (lm-eval)" in p.stdout
    assert (out / "chart.png").stat().st_size > 0


def test_an_unknown_task_is_one_line_saying_how_to_list_them(tiny_run, tasks, tmp_path):
    line = only_line(qtune_warm("eval", f"run={tiny_run}", "eval.lm_eval.tasks=[tiny_qa,no_such_task]",
                                f"eval.lm_eval.include_path={tasks}", cwd=tmp_path))
    assert line == (f"error: eval.lm_eval.tasks: no task named no_such_task; see the tasks lm-eval knows with `lm-eval ls "
                    f"tasks` (`lm-eval ls tasks --include_path {tasks}` for yours)"), line


def test_without_lm_eval_installed_it_is_one_line_naming_the_extra(tiny_run, tmp_path):
    """lm_eval made unimportable in the subprocess: a sitecustomize on its path refuses the import, as a missing
    package would (ModuleNotFoundError)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'lm_eval' or name.startswith('lm_eval.'):\n"
        "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    line = only_line(qtune("eval", f"run={tiny_run}", "eval.lm_eval.tasks=[gsm8k]", cwd=tmp_path, env=env))
    assert line == ("error: eval.lm_eval.tasks needs EleutherAI's lm-evaluation-harness, which is not installed "
                    "(lm_eval): pip install 'qtune[eval]'"), line


@pytest.mark.slow
def test_lm_eval_local_completions_scores_through_qtune_serve_as_in_process(tasks, tiny_qwen3):
    """lm-eval's `local-completions` model (log-likelihoods over HTTP: echo + logprobs on token ids) against a real
    qtune serve: the same accuracy as lm-eval's own `hf` model on the same checkpoint in process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from test_serve_limits import _start

    def acc(model: str, args: str) -> float:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tiny_qa"], limit=5, device="cpu",
                                      task_manager=TaskManager(include_path=str(tasks)))
        return out["results"]["tiny_qa"]["acc,none"]

    proc, port = _start()
    try:
        served = acc("local-completions", f"model=tiny_qwen3,base_url=http://127.0.0.1:{port}/v1/completions,"
                                          f"tokenizer={tiny_qwen3},tokenizer_backend=huggingface,max_retries=1")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert served == acc("hf", f"pretrained={tiny_qwen3},dtype=float32")
