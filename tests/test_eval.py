"""`qtune eval`: base vs adapter vs merged on the embedded SmolLM2 trained on the demo data; the judge
against a real local HTTP server that speaks the OpenAI API; one-line errors for bad input."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, one_line_error, qtune_warm

PROMPTS = REPO / "data" / "demo" / "eval_prompts.jsonl"


@pytest.mark.slow
def test_adapter_beats_base_and_the_report_has_every_answer(smol_run, smol_merged):
    p = qtune_warm("eval", f"run={smol_run}", f"eval.prompts={PROMPTS}", "eval.max_new_tokens=8")
    assert p.returncode == 0, p.stdout + p.stderr
    out = smol_run / "eval"
    for name in ("report.md", "results.jsonl", "summary.json", "chart.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())["models"]
    assert list(summary) == ["base", "adapter", "merged"]
    assert summary["adapter"]["heldout_loss"] < summary["base"]["heldout_loss"]
    assert summary["merged"]["heldout_loss"] < summary["base"]["heldout_loss"]
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    n = len(PROMPTS.read_text().splitlines())
    for model in ("base", "adapter", "merged"):
        rows = [r for r in results if r["model"] == model]
        assert len(rows) == n and all(r["answer"] for r in rows)
        assert all(r["rouge_l"] is not None and r["ttft_s"] > 0 for r in rows)
    report = (out / "report.md").read_text()
    assert "held-out loss" in report and "Answers side by side" in report
    assert all(json.loads(line)["prompt"] in report for line in PROMPTS.read_text().splitlines())
    assert "held-out loss" in p.stdout and "adapter" in p.stdout


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible grader: /v1/models and /v1/chat/completions; fails after `fail_after` grades."""
    calls = 0
    fail_after = 10**9

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "grader", "object": "model", "created": 0,
                                                          "owned_by": "test"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if type(self).calls > type(self).fail_after:
            self._send(500, {"error": {"message": "grader crashed", "type": "server_error"}})
            return
        answer = body["messages"][-1]["content"].split("Answer to grade:\n")[-1]
        grade = {"accuracy": 5 if "Captain" in answer else 2, "helpfulness": 3, "tone": 4,
                 "rationale": f"graded {len(answer)} characters"}
        self._send(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "Here: " + json.dumps(grade)}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
def judge_server():
    _Judge.calls, _Judge.fail_after = 0, 10**9
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.slow
def test_judge_scores_and_a_judge_failing_midway_leaves_the_rest(tiny_run, judge_server, tmp_path):
    _Judge.fail_after = 5  # 4 prompts × 2 models = 8 answers: the last 3 get no score
    url = f"http://127.0.0.1:{judge_server.server_port}/v1"
    p = qtune_warm("eval", f"run={tiny_run}", f"eval.prompts={PROMPTS}", "eval.max_new_tokens=4",
                   f"eval.judge_url={url}", f"eval.output_dir={tmp_path}")
    assert p.returncode == 0, p.stdout + p.stderr
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    scored = [r for r in results if r["judge"]]
    unscored = [r for r in results if not r["judge"]]
    assert len(scored) == 5 and len(unscored) == 3
    assert all(r["judge"]["tone"] == 4 and r["judge"]["rationale"].startswith("graded") for r in scored)
    assert all("InternalServerError" in r["judge_error"] for r in unscored)
    report = (tmp_path / "report.md").read_text()
    assert "The judge failed on 3 answers" in report and "judge accuracy" in report
    assert "3 answers have no judge score" in p.stderr


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # no tensors
    from qtune.config import compose, to_object
    from qtune.runs import write_config

    write_config(run, to_object(compose(["model=tiny_qwen3"])))
    return run


def test_bad_prompt_files_and_an_unreachable_judge_are_one_line(tmp_path):
    run = _fake_run(tmp_path)
    line = one_line_error(qtune_warm("eval", f"run={run}", f"eval.prompts={tmp_path}/missing.jsonl"))
    assert "missing.jsonl: no such file" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    line = one_line_error(qtune_warm("eval", f"run={run}", f"eval.prompts={bad}"))
    assert "bad.jsonl:2: malformed JSON" in line
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt key"}\n')
    line = one_line_error(qtune_warm("eval", f"run={run}", f"eval.prompts={bad}"))
    assert 'bad.jsonl:2: each line needs a non-empty "prompt"' in line
    bad.write_text('{"prompt": "fine", "facts": [2]}\n')
    line = one_line_error(qtune_warm("eval", f"run={run}", f"eval.prompts={bad}"))
    assert 'bad.jsonl:1: "facts" must be a non-empty string or list of strings' in line
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "hi"}\n')
    line = one_line_error(qtune_warm("eval", f"run={run}", f"eval.prompts={good}",
                                     "eval.judge_url=http://127.0.0.1:9/v1"))
    assert "eval.judge_url=http://127.0.0.1:9/v1: the judge cannot be reached" in line


def test_metrics():
    from qtune.evaluation.metrics import consistency, exact_match, rouge_l, token_f1

    assert exact_match("The Rome.", "rome") == 1.0 and exact_match("Paris", "Rome") == 0.0
    assert token_f1("rome is the capital", "the capital is rome") == 1.0
    assert 0 < token_f1("rome is big", "rome is the capital") < 1
    assert rouge_l("a b c d", "a b c d") == 1.0 and rouge_l("x y", "a b") == 0.0
    assert consistency(["Yes.", "yes", "no"]) == pytest.approx(2 / 3)
    from qtune.evaluation.metrics import facts_score, reference_scores

    # the style of a reference without its fact scores high on ROUGE-L and zero on facts
    ref = "Captain's log: A bicycle has two wheels. All hands steady. End of entry."
    wrong = "Captain's log: A bicycle has four wheels. All hands steady. End of entry."
    scores = reference_scores(wrong, ref, ["two|2"])
    assert scores["rouge_l"] > 0.9 and scores["facts_right"] == 0.0
    assert facts_score("It has 2 wheels.", ["two|2"]) == 1.0 and facts_score("Rome, Italy", ["rome", "italy"]) == 1.0
    assert facts_score("Romeo", ["Rome"]) == 0.0  # whole words only


def test_a_run_trained_with_relative_paths_evaluates_from_any_folder(tiny_run, tmp_path, monkeypatch):
    """The run's config.yaml keeps its data as absolute paths, and eval=demo's prompts ship with qtune: `qtune eval
    run=<absolute>` works from a folder that holds neither the data nor the run."""
    import shutil

    import yaml

    from qtune.config import compose, to_object
    from qtune.runs import write_config

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for name in ("captains_log.jsonl", "held_out.jsonl"):
        shutil.copy(REPO / "data" / "demo" / name, project / "data")
    run = shutil.copytree(tiny_run, project / "runs" / "r")
    monkeypatch.chdir(project)   # as `qtune train data.path=data/... data.eval_path=data/...` run from the project
    write_config(run, to_object(compose(["model=tiny_qwen3", "data.path=data/captains_log.jsonl",
                                         "data.eval_path=data/held_out.jsonl", "train.output_dir=runs/r"])))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["eval_path"] == str(project / "data" / "held_out.jsonl")
    assert saved["train"]["output_dir"] == str(run)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = qtune_warm("eval", f"run={run}", "eval=demo", "eval.models=[adapter]", "eval.max_new_tokens=2", cwd=elsewhere)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((run / "eval" / "summary.json").read_text())
    assert report["models"]["adapter"]["heldout_loss"] > 0 and report["heldout_rows"] > 0
    assert len([x for x in (run / "eval" / "results.jsonl").read_text().splitlines() if x.strip()]) == 4


def test_demo_data_and_prompts_resolve_to_files_from_any_folder(tmp_path, monkeypatch):
    from qtune.config import compose, to_object

    monkeypatch.chdir(tmp_path)
    cfg = to_object(compose(["data=demo", "eval=demo"]))
    for path in (cfg.data.path, cfg.data.eval_path, cfg.eval.prompts):
        assert Path(path).is_absolute() and Path(path).is_file(), path
