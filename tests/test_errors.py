"""Bad input gets one line naming the key, file or line and what is valid, and a non-zero exit — never a traceback.
Tables: add a row for each new case (verb, overrides, the words the line must hold). CASES need nothing on disk;
FILE_CASES first make what they name: `{tmp}` in an override is a fresh folder, `{run}` a copy of a real tiny run
(conftest's tiny_run), which the row's `make` may damage, and `{rm}` a copy of a tiny reward-model run (tiny_rm_run). Most rows fail before torch loads: about a second each."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, one_line_error, only_line, qtune

CASES = [
    ("train", ["train.lr=-1"], "train.lr=-1: valid: > 0"),
    ("train", ["train.epochs=0"], "train.epochs=0: valid: > 0"),
    ("train", ["data.max_length=-5"], "data.max_length=-5: valid: >= 1"),
    ("prepare", ["data.max_length=-5"], "data.max_length=-5: valid: >= 1"),
    ("train", ["data.val_size=2.5"], "data.val_size=2.5: valid: a fraction 0 <= x < 1 of the examples, or a whole number"),
    ("train", ["data.val_size=-0.1"], "data.val_size=-0.1: valid: a fraction"),
    ("train", ["train.fast=maybe"], "train.fast=maybe: valid: auto, true, false"),
    ("train", ["train.offload_activations=yes"], "train.offload_activations=yes: valid: auto, true, false"),
    ("chat", ["chat.max_new_tokens=0"], "chat.max_new_tokens=0: valid: >= 1"),
    ("chat", ["chat.temperature=-1"], "chat.temperature=-1: valid: >= 0"),
    ("chat", ["chat.top_p=1.5"], "chat.top_p=1.5: valid: > 0 and <= 1"),
    ("serve", ["serve.port=99999"], "serve.port=99999: valid: >= 1 and <= 65535"),
    ("serve", ["serve.port=0"], "serve.port=0: valid: >= 1 and <= 65535"),
    ("inspect-moe", ["model=qwen3_30b_a3b", "moe.max_experts=-1"], "moe.max_experts=-1: valid: >= 1"),
    ("inspect-moe", ["model=qwen3_30b_a3b", "moe.max_experts=0"], "moe.max_experts=0: valid: >= 1"),
    ("train", ["lora.alpha=0"], "lora.alpha=0: valid: > 0 (the adapter's output is scaled by lora.alpha / lora.r"),
    ("train", ["lora.alpha=-16"], "lora.alpha=-16: valid: > 0"),
    ("train", ["lora.r=0"], "lora.r must be a positive integer, got 0"),
    ("train", ["lora.dropout=1"], "lora.dropout must be in [0, 1), got 1.0"),
    # unknown names, keys and shapes
    ("train", ["model=qwen3_9b"], "model=qwen3_9b: no such option; valid: qwen3_0_6b"),
    ("download", ["model=llama_7b"], "model=llama_7b: no such option; valid:"),
    ("inspect-moe", ["moe=experts"], "moe=experts: no such option; valid: all, expert_only"),
    ("train", ["lora.rr=8"], "lora.rr: unknown key in 'lora'; did you mean lora.r?"),
    ("prepare", ["data.on_error=maybe"], "data.on_error=maybe: invalid choice; valid: raise, skip"),
    ("prepare", ["data.sources=[{weight: 1}]"], "data.sources[0].path: missing value"),
    ("prepare", ["data.path=["], "cannot parse override 'data.path=['"),
    ("merge", ["merge.dtype=fp8"], "merge.dtype=fp8: invalid choice; valid: auto, bf16, fp16, fp32"),
    ("serve", ["serve.adapters=[runs/b]"], "serve.adapters: expected a mapping like {name: value}, got a list"),
    ("serve", ["serve.adapters={b: {path: runs/b}}"], "serve.adapters.b: expected a run or adapter folder"),
    ("eval", ["eval.repeats=0"], "eval.repeats must be at least 1"),
    ("inspect-moe", ["model=qwen3_30b_a3b", "moe=router_only", "moe.router_mode=frozen"],
     "moe.scope=router_only adapts the router, but moe.router_mode=frozen"),
    # run folders that are not there
    ("merge", [], "run: which run folder? set run=runs/<name>"),
    ("chat", ["run=/nowhere/run"], "run=/nowhere/run: no adapter/ there"),
    ("serve", ["run=/nowhere/run"], "run=/nowhere/run: no adapter/ there"),
    ("eval", ["run=/nowhere/run"], "run=/nowhere/run: no adapter/ there"),
    ("prepare", ["data.path=/nowhere/chats.jsonl"], "/nowhere/chats.jsonl: no such file, folder or glob match"),
    # training stages
    ("train", ["train.stage=ppo"], "train.stage=ppo: TRL no longer ships PPO in its stable API; for preference tuning "
     "use train.stage=dpo (chosen/rejected pairs) or train.stage=kto"),
    ("train", ["train.stage=orpo"], "train.stage=orpo: valid: pt, sft, dpo, kto, rm, grpo"),
    ("train", ["train.stage=grpo", "train.grpo.num_generations=1"], "train.grpo.num_generations=1: valid: >= 2"),
    ("train", ["train.stage=grpo", "train.grpo.generation=qtune"], "train.grpo.generation=qtune: qtune's rollout "
     "engine is not available yet; use train.grpo.generation=transformers"),
    ("train", ["train.stage=grpo", "train.grpo.rewards=[{fn: exact}]"], "train.grpo.rewards[0].fn=exact: no such "
     "reward; built-in: exact_answer, format, length, or your own as module:function or path/to/file.py:function"),
    ("train", ["train.stage=grpo", "train.grpo.rewards=[{fn: no_such_module:f}]"], "train.grpo.rewards[0].fn="
     "no_such_module:f: cannot import no_such_module (ModuleNotFoundError: No module named 'no_such_module')"),
    ("train", ["model=tiny_qwen3", "train.stage=grpo", "train.grpo.max_completion_length=3000"],
     "train.grpo.max_completion_length=3000: with prompts of up to data.max_length=2048 tokens it passes "
     "tiny_qwen3's context of 4096 tokens (model.arch.max_position_embeddings); valid: <= 2048"),
    ("train", ["train.stage=grpo", "--dry-run", "train.grpo.max_completion_length=100000"],
     "train.grpo.max_completion_length=100000: with prompts"),
    ("train", ["train.stage=kto"], "train.stage=kto needs train.batch_size >= 2 (got 1)"),
    ("train", ["train.dpo.bta=0.2"], "train.dpo.bta: unknown key in 'train.dpo'; did you mean train.dpo.beta?"),
    ("train", ["train.kto.weight=2"], "train.kto.weight: unknown key in 'train.kto'"),
    ("train", ["train.dpo.loss_type=ppo"], "train.dpo.loss_type=ppo: invalid choice; valid: sigmoid, hinge, ipo"),
    ("train", ["train.dpo.beta=0"], "train.dpo.beta=0: valid: > 0"),
    ("train", ["train.dpo.label_smoothing=0.5"], "train.dpo.label_smoothing=0.5: valid: >= 0 and < 0.5"),
    ("train", ["train.dpo.loss_type=exo_pair"], "train.dpo.loss_type=exo_pair needs train.dpo.label_smoothing > 0"),
    ("train", ["train.kto.undesirable_weight=-1"], "train.kto.undesirable_weight=-1: valid: > 0"),
    ("train", ["train.stage=rm", "train.sample_prompts=[hi]"], "train.sample_prompts: a reward model (train.stage=rm) "
     "scores answers, it writes none"),
    ("train", ["train.stage=dpo", f"data.path={REPO}/data/demo/preferences.jsonl", "train.init_adapter=/nowhere/run"],
     "train.init_adapter: /nowhere/run is neither a run folder nor an adapter folder"),
    # several processes: refused before any starts
    ("train", ["model=tiny_qwen3", f"data.path={REPO / 'data' / 'demo' / 'captains_log.jsonl'}", "train.device=cpu",
               "train.nproc=2", "train.backend=nccl"], "train.backend=nccl: NCCL is unavailable (this run is on the CPU)"),
    ("train", ["train.nproc=0"], "train.nproc must be a positive integer"),
]


@pytest.mark.parametrize("verb,overrides,words", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_setting_is_one_line_naming_the_key(verb, overrides, words):
    p = qtune(verb, *overrides)
    assert words in only_line(p), p.stderr


DEMO = str(REPO / "data" / "demo" / "captains_log.jsonl")
PAIRS = str(REPO / "data" / "demo" / "preferences.jsonl")
TRAIN = ["model=tiny_qwen3", f"data.path={DEMO}"]
# Root writes through chmod; without the capabilities that let it (setpriv), root meets read-only folders as anyone.
NOT_ALL_POWERFUL = (("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
                    if os.geteuid() == 0 and shutil.which("setpriv") else ())
NO_READ_ONLY = os.geteuid() == 0 and not NOT_ALL_POWERFUL


def _write(name: str, data: bytes):
    return lambda tmp, run: (tmp / name).write_bytes(data)


def _cut(relative: str, size: int = 100):
    """Truncate a file of the run copy to `size` bytes."""
    def make(tmp, run):
        with open(run / relative, "r+b") as f:
            f.truncate(size)
    return make


def _resumable(*damage):
    """The run copy without its final adapter (so `train` resumes it), damaged by each of `damage`."""
    def make(tmp, run):
        shutil.rmtree(run / "adapter")
        (run / "summary.json").unlink()
        for d in damage:
            d(tmp, run)
    return make


def _merged(tmp, run):
    """A merged/ folder whose only shard was cut short."""
    model = Path(os.environ["QTUNE_HOME"]) / "models" / "tiny_qwen3"
    (run / "merged").mkdir()
    shutil.copy(model / "config.json", run / "merged")
    (run / "merged" / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:5000])


def _read_only(path: str, inside: bool = False):
    def make(tmp, run):
        (tmp / path).mkdir()
        if inside:
            (tmp / path / "x").mkdir()
        (tmp / path).chmod(0o555)
    make.read_only = True
    return make


UTF16 = '{"input": "a", "output": "b"}\n'.encode("utf-16-le")   # no byte-order mark: NUL bytes to a UTF-8 reader
NOT_JSON = b'{"r": 16,\n'
FILE_CASES = [
    # data files
    ("prepare", ["data.path={tmp}/d.jsonl"], "d.jsonl: binary data (NUL bytes), not UTF-8 text; save it as UTF-8",
     _write("d.jsonl", UTF16)),
    ("train", [*TRAIN[:1], "data.path={tmp}/d.jsonl", "train.output_dir={tmp}/r"], "d.jsonl: binary data (NUL bytes)",
     _write("d.jsonl", bytes(range(256)))),
    ("prepare", ["data.path={tmp}/d.jsonl"], "d.jsonl:2: not UTF-8 text (byte 0xe9 at column 12)",
     _write("d.jsonl", b'{"input": "a", "output": "b"}\n{"input": "\xe9t\xe9", "output": "b"}\n')),
    ("prepare", ["data.path={tmp}/d.csv"], "d.csv:1: not UTF-8 text", _write("d.csv", "prompt,réponse\n".encode("cp1252"))),
    ("prepare", ["data.path={tmp}/d.parquet"], "d.parquet: not a Parquet file (0 bytes", _write("d.parquet", b"")),
    ("train", [*TRAIN[:1], "data.path={tmp}/d.parquet"], "d.parquet: not a Parquet file (12 bytes",
     _write("d.parquet", b"a,b\nc,d\ne,f\n")),
    ("prepare", ["data.path={tmp}/d.txt"], "d.txt: unsupported file type '.txt'", _write("d.txt", b"hello")),
    ("prepare", ["data.path={tmp}"], "no data files (.jsonl, .json, .csv, .parquet, .tsv) found", _write("notes.md", b"x")),
    ("prepare", ["model=tiny_qwen3", "data.path={tmp}/d.jsonl"], "d.jsonl:2: malformed JSON",
     _write("d.jsonl", b'{"input": "a", "output": "b"}\n{"input": oops}\n')),
    ("prepare", ["model=tiny_qwen3", "data.path={tmp}/d.jsonl"], "d.jsonl:2: messages[1]: field 'tool_calls': tool calls "
     "are not supported yet", _write("d.jsonl", b'{"input": "a", "output": "b"}\n{"messages": [{"role": "user", '
                                     b'"content": "Weather?"}, {"role": "assistant", "content": null, "tool_calls": '
                                     b'[{"type": "function", "function": {"name": "w", "arguments": "{}"}}]}]}\n')),
    ("prepare", ["model=tiny_qwen3", "data.path={tmp}/d.jsonl"], "d.jsonl:1: key 'output' appears twice in one JSON "
     "object", _write("d.jsonl", b'{"input": "a", "output": "b", "output": "c"}\n')),
    ("prepare", ["model=tiny_qwen3", "data.path={tmp}/d.json"], "d.json:1: field 'output' holds a lone surrogate \\ud83d",
     _write("d.json", b'[{"input": "a", "output": "\\ud83d"}]')),
    ("prepare", ["model=tiny_qwen3", "data.path={tmp}/d.jsonl"], "d.jsonl:1: the conversation opens with an assistant "
     "turn", _write("d.jsonl", b'{"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "a"}, '
                    b'{"from": "gpt", "value": "b"}]}\n')),
    ("prepare", ["model=tiny_qwen3", "train.stage=dpo", "data.path={tmp}/d.jsonl"], "d.jsonl: no usable records: in "
     "all 1 pair", _write("d.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "b"}\n')),
    ("eval", ["run={run}", "eval.prompts={tmp}/p.jsonl"], "p.jsonl: binary data (NUL bytes)", _write("p.jsonl", UTF16)),
    # damaged files in a run
    ("chat", ["run={run}", "--prompt", "hi"], "adapter/adapter_model.safetensors is damaged (truncated: 100 bytes",
     _cut("adapter/adapter_model.safetensors")),
    ("serve", ["run={run}"], "checkpoint-2 holds the same adapter: copy its adapter files into",
     _cut("adapter/adapter_model.safetensors")),
    ("chat", ["run={run}", "--prompt", "hi"], "adapter/adapter_config.json is damaged (not valid JSON",
     lambda tmp, run: (run / "adapter" / "adapter_config.json").write_bytes(NOT_JSON)),
    ("eval", ["run={run}"], "adapter/adapter_config.json is damaged (not valid JSON",
     lambda tmp, run: (run / "adapter" / "adapter_config.json").write_bytes(NOT_JSON)),
    ("merge", ["run={run}"], "or train again with train.overwrite=true", _cut("adapter/adapter_config.json", 5)),
    ("chat", ["run={run}", "--prompt", "hi"], "config.yaml is damaged (not a qtune run config)",
     lambda tmp, run: (run / "config.yaml").write_text("model: [")),
    ("chat", ["run={run}", "--prompt", "hi"], "merged/model.safetensors is damaged (truncated: 5,000 of", _merged),
    ("eval", ["run={run}", "eval.models=[merged]"], "again to replace it", _merged),
    ("serve", ["run={run}", "serve.adapters={b: {tmp}/b}"], "b/adapter_model.safetensors is damaged",
     lambda tmp, run: _cut("adapter_model.safetensors", 0)(tmp, shutil.copytree(run / "adapter", tmp / "b"))),
    ("train", [*TRAIN, "train.output_dir={run}"],
     "checkpoint-2/optimizer.pt is damaged (truncated or not a torch archive: 100 bytes, no zip directory at its end); "
     "delete that checkpoint and run the same command again (it resumes from checkpoint-1)",
     _resumable(_cut("checkpoints/checkpoint-2/optimizer.pt"))),
    ("train", [*TRAIN, "train.output_dir={run}"], "checkpoint-2/adapter_model.safetensors is damaged (truncated: 0 bytes",
     _resumable(_cut("checkpoints/checkpoint-2/adapter_model.safetensors", 0))),
    ("train", [*TRAIN, "train.output_dir={tmp}/new", "train.resume={run}/checkpoints/checkpoint-1"],
     "checkpoint-1/rng_state.pth is damaged", _cut("checkpoints/checkpoint-1/rng_state.pth")),
    # output folders
    ("train", [*TRAIN, "train.output_dir={tmp}/f"], "is a file; name a folder", _write("f", b"mine")),
    ("train", [*TRAIN, "train.output_dir={tmp}/f/run"], "f is a file, so no folder can be made under it",
     _write("f", b"mine")),
    ("merge", ["run={run}", "merge.output_dir={tmp}/f"], "is a file; name a folder", _write("f", b"mine")),
    ("merge", ["run={run}", "merge.output_dir={tmp}/f/merged"], "f is a file, so no folder can be made under it",
     _write("f", b"mine")),
    ("merge", ["run={run}", "merge.output_dir={tmp}"], "holds files that no qtune merge wrote", _write("mine.txt", b"x")),
    pytest.param("train", [*TRAIN, "train.output_dir={tmp}/ro/run"], "cannot be created: ", _read_only("ro"),
                 marks=pytest.mark.skipif(NO_READ_ONLY, reason="root without setpriv writes into read-only folders")),
    pytest.param("train", [*TRAIN, "train.output_dir={tmp}/ro"], "is read-only", _read_only("ro"),
                 marks=pytest.mark.skipif(NO_READ_ONLY, reason="root without setpriv writes into read-only folders")),
    pytest.param("merge", ["run={run}", "merge.output_dir={tmp}/ro/x"], "cannot be replaced", _read_only("ro", inside=True),
                 marks=pytest.mark.skipif(NO_READ_ONLY, reason="root without setpriv writes into read-only folders")),
    # training stages: data of another stage, bad preference records, an adapter to start from that does not fit
    ("train", [*TRAIN[:1], "train.stage=dpo", "data.path={tmp}/d.jsonl", "train.output_dir={tmp}/r"],
     "d.jsonl:1: train.stage=dpo trains on preference pairs ({\"prompt\", \"chosen\", \"rejected\"}); this record is "
     "messages", _write("d.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')),
    ("prepare", ["train.stage=pt", "data.path={tmp}/d.jsonl"], "d.jsonl:2: train.stage=pt trains on raw text",
     _write("d.jsonl", b'{"text": "a log"}\n{"prompt": "a", "completion": "b"}\n')),
    ("prepare", ["train.stage=kto", "train.batch_size=2", "data.path={tmp}/d.jsonl"],
     "d.jsonl:1: field 'label' must be true (a desirable answer) or false, got 'yes'",
     _write("d.jsonl", b'{"prompt": "a", "completion": "b", "label": "yes"}\n')),
    ("prepare", ["train.stage=grpo", "data.path={tmp}/d.jsonl"], "d.jsonl:2: a prompt record needs 'prompt' (text "
     "or messages) or 'question'; fields found: answer, text", _write("d.jsonl", b'{"prompt": "1+1?", "answer": "2"}\n'
                                                                        b'{"text": "1+1?", "answer": "2"}\n')),
    ("train", ["train.stage=grpo", "train.grpo.rewards=[{fn: '{tmp}/r.py:score'}]"], "/r.py (ModuleNotFoundError: No module named 'sympy_not_here')",
     _write("r.py", b"import sympy_not_here\n\ndef score(**kw):\n    return []\n")),
    ("train", ["train.stage=grpo", "train.grpo.rewards=[{fn: '{tmp}/r.py:scor'}]"], "/r.py has no function 'scor'",
     _write("r.py", b"def score(**kw):\n    return []\n")),
    ("prepare", ["train.stage=rm", "data.path={tmp}/d.jsonl"], "d.jsonl:1: a preference pair needs its prompt",
     _write("d.jsonl", b'{"question": "a", "chosen": "b", "rejected": "c"}\n')),
    ("train", [*TRAIN[:1], "train.stage=dpo", f"data.path={PAIRS}", "train.init_adapter={run}", "lora=r8",
               "train.output_dir={tmp}/r"],
     "adapter: that adapter has r=16, this run would make r=8; set lora.r as it was trained", lambda tmp, run: None),
    # a reward model (train.stage=rm) scores answers: the verbs that write them refuse it, eval and merge know it
    ("chat", ["run={rm}", "--prompt", "hi"], "is a reward model (train.stage=rm): it scores answers and writes none",
     lambda tmp, run: None),
    ("serve", ["run={rm}"], "is a reward model (train.stage=rm): it scores answers and writes none", lambda tmp, run: None),
    ("serve", ["run={run}", "serve.adapters={b: {rm}}"], "rm is a reward model (train.stage=rm)", lambda tmp, run: None),
    ("eval", ["run={rm}", f"eval.prompts={REPO}/data/demo/eval_prompts.jsonl"],
     "is a reward model (train.stage=rm), which writes no answers", lambda tmp, run: None),
    ("eval", ["run={rm}", "eval.models=[base]"], "eval.models: base: ", lambda tmp, run: None),
    ("merge", ["run={rm}", "merge.gguf=[f16]"], "is a reward model (train.stage=rm), which merges into a "
     "sequence-classification checkpoint only", lambda tmp, run: None),
    # a resume that would change what a step means (qtune.training.distributed.check_resume; tiny_run: global batch 1)
    ("train", [*TRAIN, "train.output_dir={run}", "train.grad_accum=2"],
     "was trained with a global batch of 1 (1 × 1 × 1 process), this run's is 2; keep it (train.grad_accum=1 with 1 "
     "process)", _resumable()),
]


def _id(case) -> str:
    verb, overrides, words = (case.values if hasattr(case, "values") else case)[:3]
    return f"{verb}:{words[:50]}"


def _run_case(verb, overrides, make, tiny_run, tmp_path, request=None):
    tmp, run, rm = tmp_path / "tmp", tmp_path / "run", tmp_path / "rm"
    tmp.mkdir()
    if any("{run}" in o for o in overrides):
        shutil.copytree(tiny_run, run)
    if any("{rm}" in o for o in overrides):  # `{rm}`: a copy of a real tiny reward-model run (conftest's tiny_rm_run)
        shutil.copytree(request.getfixturevalue("tiny_rm_run"), rm)
    make(tmp, run)
    try:
        return qtune(verb, *[o.replace("{tmp}", str(tmp)).replace("{run}", str(run)).replace("{rm}", str(rm))
                             for o in overrides], cwd=tmp_path,
                     prefix=NOT_ALL_POWERFUL if getattr(make, "read_only", False) else ())
    finally:
        for ro in tmp.glob("ro"):
            ro.chmod(0o755)


@pytest.mark.parametrize("verb,overrides,words,make", FILE_CASES, ids=[_id(c) for c in FILE_CASES])
def test_bad_file_or_folder_is_one_line_naming_it(verb, overrides, words, make, tiny_run, tmp_path, request):
    p = _run_case(verb, overrides, make, tiny_run, tmp_path, request)
    line = only_line(p)
    assert words in line, p.stderr
    assert str(tmp_path) in line  # the file or folder, by name


# Several processes (train.nproc=2 on CPU): these are found once the processes run, after they have loaded the
# libraries, whose own notices may precede the line on stderr; the line itself is still one, printed once.
PROCESS_CASES = [
    ("train", [*TRAIN, "data.max_length=256", "train.output_dir={tmp}/r", "train.nproc=2", "train.distributed=fsdp"],
     "train.distributed=fsdp: accelerate runs FSDP on GPUs only (here it would fall back to DDP on cpu)", _write("x", b"")),
    ("train", [*TRAIN, "train.output_dir={tmp}/r", "train.nproc=2"],  # 2048-token packs: the demo set is one row
     "data: 1 packed training row cannot give each of 2 processes a batch of train.batch_size=1", _write("x", b"")),
    ("train", [*TRAIN, "train.output_dir={run}", "train.nproc=2", "train.distributed=fsdp"],
     "train.distributed: {run}/checkpoints/checkpoint-2 was saved by single and this run would resume it with fsdp; "
     "resume it with train.distributed=ddp or one process", _resumable()),
]


@pytest.mark.slow
@pytest.mark.parametrize("verb,overrides,words,make", PROCESS_CASES, ids=[_id(c) for c in PROCESS_CASES])
def test_multi_process_refusal_is_one_line(verb, overrides, words, make, tiny_run, tmp_path):
    p = _run_case(verb, overrides, make, tiny_run, tmp_path)
    assert words.replace("{run}", str(tmp_path / "run")) in one_line_error(p), p.stderr


def test_download_of_an_unknown_repo_is_one_line(tmp_path):
    from hubserver import FakeHub

    with FakeHub() as hub:
        p = qtune("download", "model=tiny_qwen3", "model.source=hub", "model.repo_id=nobody/nothing",
                  f"model.local_dir={tmp_path / 'm'}", cwd=tmp_path,
                  env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")})
    assert "model.repo_id=nobody/nothing: repository not found" in only_line(p), p.stderr


def test_good_values_at_the_edges_compose():
    from qtune.config import compose, to_object

    cfg = to_object(compose(["data.val_size=200", "chat.temperature=0", "serve.port=65535", "chat.top_p=1",
                             "moe.max_experts=1"]))
    assert cfg.serve.port == 65535 and cfg.moe.max_experts == 1 and cfg.data.val_size == 200
    assert to_object(compose(["data.val_size=0"])).data.val_size == 0
    adapters = to_object(compose(["serve.adapters={b: runs/b, c: /adapters/c}"])).serve.adapters
    assert adapters == {"b": "runs/b", "c": "/adapters/c"}
