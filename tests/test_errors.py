"""Bad input gets one line naming the key, file or line and what is valid, and a non-zero exit — never a traceback.
Tables: add a row for each new case (verb, overrides, the words the line must hold). CASES need nothing on disk;
FILE_CASES first make what they name: `{tmp}` in an override is a fresh folder, `{run}` a copy of a real tiny run
(conftest's tiny_run), which the row's `make` may damage, and `{rm}` a copy of a tiny reward-model run (tiny_rm_run).
Each row is the real `qtune` command (its main(), exit status, stdout and stderr) in a process forked from one that has
imported torch and the libraries (conftest's qtune_warm): a fresh interpreter would spend ~10 s of each row on those
imports. The rows that need a fresh one (another user's rights through setpriv, the Hub's environment) run so."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, one_line_error, only_line, qtune, qtune_warm

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
    ("serve", ["serve.engine=fast"], "serve.engine=fast: valid: builtin, vllm, auto"),
    ("serve", ["serve.liger=maybe"], "serve.liger=maybe: valid: auto, true, false"),
    ("serve", ["model=tiny_qwen3", "serve.liger=true"], "serve.liger=true: liger kernels need CUDA "
     "(serve.liger=auto serves without them)"),
    ("serve", ["serve.engine=vllm", "serve.vllm_bin=/nowhere/vllm"], "serve.vllm_bin=/nowhere/vllm: no vllm executable there"),
    ("serve", ["serve.vllm_args=--max-model-len"], "serve.vllm_args"),
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
    # mistyped keys: the closest of all dotted keys, and other tools' names for qtune's settings
    ("train", ["train.lerning_rate=1e-4"],
     "train.lerning_rate: unknown key in 'train'; did you mean train.lr (qtune's name for learning_rate)?"),
    ("train", ["+num_train_epochs=2"], "did you mean train.epochs (qtune's name for num_train_epochs)?"),
    ("train", ["per_device_train_batch_size=4"], "did you mean train.batch_size (qtune's name for "
     "per_device_train_batch_size)?"),
    ("train", ["train.gradient_accumulation_steps=4"], "did you mean train.grad_accum (qtune's name for "
     "gradient_accumulation_steps)?"),
    ("train", ["lora.lora_rank=8"], "lora.lora_rank: unknown key in 'lora'; did you mean lora.r (qtune's name for lora_rank)?"),
    ("train", ["+lora_alpha=16"], "did you mean lora.alpha (qtune's name for lora_alpha)?"),
    ("prepare", ["data.cutoff_len=1024"], "did you mean data.max_length (qtune's name for cutoff_len)?"),
    ("train", ["output_dir=runs/x"], "output_dir: unknown key in the top level; did you mean train.output_dir?"),
    ("train", ["trian.lr=1e-4"], "trian: unknown key in the top level; did you mean train.lr?"),
    ("train", ["lora.epochs=2"], "lora.epochs: unknown key in 'lora'; did you mean train.epochs?"),
    ("chat", ["chat.temp=0"], "chat.temp: unknown key in 'chat'; did you mean chat.temperature?"),
    ("train", ["+load_in_4bit=true"], "did you mean quant=nf4 (qtune's name for load_in_4bit)?"),
    # a sweep's values are read before any job starts: a value Hydra cannot take fails the sweep in one line
    ("train", ["-m", "train.lr=1e-4,abc"], "train.lr=abc: expected a number"),
    ("train", ["-m", "lora.rr=8,16"], "lora.rr: unknown key in 'lora'; did you mean lora.r?"),
    ("train", ["-m", "+train.lerning_rate=1e-4,2e-4"], "did you mean train.lr (qtune's name for learning_rate)?"),
    ("prepare", ["data.on_error=maybe"], "data.on_error=maybe: invalid choice; valid: raise, skip"),
    ("prepare", ["data.sources=[{weight: 1}]"], "data.sources[0].path: missing value"),
    ("prepare", ["data.path=["], "cannot parse override 'data.path=['"),
    ("merge", ["merge.dtype=fp8"], "merge.dtype=fp8: invalid choice; valid: auto, bf16, fp16, fp32"),
    ("serve", ["serve.adapters=[runs/b]"], "serve.adapters: expected a mapping like {name: value}, got a list"),
    ("serve", ["serve.adapters={b: {path: runs/b}}"], "serve.adapters.b: expected a run or adapter folder"),
    ("eval", ["eval.repeats=0"], "eval.repeats must be at least 1"),
    ("inspect-moe", ["model=qwen3_30b_a3b", "moe=router_only", "moe.router_mode=frozen"],
     "moe.scope=router_only adapts the router, but moe.router_mode=frozen"),
    # the embedded model is read from its package's file: another repo_id would be ignored
    ("train", ["model.repo_id=Some/Repo"], "model.repo_id=Some/Repo: model=smollm2_135m is the embedded "
     "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("chat", ["model.repo_id=Some/Repo"], "e.g. model=qwen3_8b model.repo_id=Some/Repo (options: qwen3_0_6b,"),
    # run folders that are not there
    ("merge", [], "run: which run folder? set run=runs/<name>"),
    ("chat", ["run=/nowhere/run"], "run=/nowhere/run: no such folder; name a run folder `qtune train` wrote"),
    ("serve", ["run=/nowhere/run"], "run=/nowhere/run: no such folder"),
    ("eval", ["run=/nowhere/run"], "run=/nowhere/run: no such folder"),
    ("merge", ["run=/nowhere/run"], "run=/nowhere/run: no such folder"),
    ("prepare", ["data.path=/nowhere/chats.jsonl"], "/nowhere/chats.jsonl: no such file, folder or glob match"),
    ("push", ["run=/nowhere/run", "hub.repo_id=me/x"], "run=/nowhere/run: no such folder"),
    ("push", ["run=/nowhere/run"], "hub.repo_id: which Hub repo? set hub.repo_id=<owner>/<name>"),
    ("push", ["hub.repo_id=just-a-name"], "hub.repo_id=just-a-name: valid: owner/name"),
    ("push", ["hub.what=weights"], "hub.what=weights: invalid choice; valid: adapter, merged, gguf"),
    ("eval", ["eval.lm_eval.limit=0"], "eval.lm_eval.limit=0: valid: > 0"),
    ("eval", ["eval.lm_eval.limit=2.5"], "eval.lm_eval.limit=2.5: valid: a fraction 0 < x < 1 of each task, or a whole"),
    ("eval", ["eval.lm_eval.num_fewshot=-1"], "eval.lm_eval.num_fewshot=-1: valid: >= 0"),
    # train.method=full|freeze (the dry run reads the meta-device model: no weights needed)
    ("train", ["model=tiny_qwen3", "train.method=freeze", "train.freeze.trainable_layers=3", "--dry-run"],
     "train.freeze.trainable_layers=3: the model has 2 decoder layers; valid: 1 to 2 (the last N) or -1 to -2 (the "
     "first |N|)"),
    ("train", ["train.method=freeze", "train.freeze.trainable_layers=0"],
     "train.freeze.trainable_layers=0: valid: N > 0 (the last N decoder layers) or N < 0 (the first |N|)"),
    ("train", ["model=tiny_qwen3", "train.method=freeze", "train.freeze.trainable_modules=[mlpp]", "--dry-run"],
     "train.freeze.trainable_modules: 'mlpp' matches nothing in a decoder layer; valid: all, self_attn, "
     "self_attn.q_proj"),
    ("train", ["model=tiny_qwen3_moe", "train.method=freeze", "train.freeze.trainable_modules=[experts]", "--dry-run"],
     "'experts' matches nothing in a decoder layer; valid: all, self_attn, self_attn.q_proj, self_attn.k_proj, "
     "self_attn.v_proj, self_attn.o_proj, self_attn.q_norm, self_attn.k_norm, mlp, mlp.experts, mlp.gate, "
     "input_layernorm, post_attention_layernorm"),
    ("train", ["model=tiny_qwen3", "train.method=freeze", "train.freeze.extra_modules=[head]", "--dry-run"],
     "train.freeze.extra_modules: 'head' matches nothing outside the decoder layers; valid: embed_tokens, norm"),
    ("train", ["train.method=full", "quant=nf4"], "train.method=full with quant=nf4: a quantized base trains adapters "
     "only (its 4/8-bit weights take no gradient); use quant=none, or train.method=lora (QLoRA)"),
    ("train", ["train.method=freeze", "lora.r=64", "--dry-run"], "train.method=freeze trains the weights themselves, "
     "so lora.r=64 would change nothing; leave the lora.* settings out, or use train.method=lora"),
    ("train", ["train.method=full", "train.init_adapter=runs/x"], "train.init_adapter: train.method=full trains the "
     "weights themselves, not an adapter"),
    ("train", ["train.optim=galore_adamw", "--dry-run"], "train.optim=galore_adamw needs galore_torch, which is not "
     "installed here (pip install galore-torch); or use train.optim=adamw_torch_fused"),
    ("train", ["train.optim=adamw_tourch"], "train.optim=adamw_tourch: not an optimizer transformers knows; valid: "
     "adamw_torch, adamw_torch_fused"),
    # training stages
    ("train", ["train.stage=ppo"], "train.stage=ppo: TRL no longer ships PPO in its stable API; for preference tuning "
     "use train.stage=dpo (chosen/rejected pairs) or train.stage=kto"),
    ("train", ["train.stage=orpo"], "train.stage=orpo: valid: pt, sft, dpo, kto, rm, grpo"),
    ("train", ["train.stage=grpo", "train.grpo.num_generations=1"], "train.grpo.num_generations=1: valid: >= 2"),
    ("train", ["train.stage=grpo", "--dry-run", "quant=int8", "train.grpo.generation=qtune"],
     "train.grpo.generation=qtune with quant=int8: the engine's CUDA graph cannot hold LLM.int8's matmul"),
    ("train", ["train.stage=grpo", "train.grpo.rewards=[{fn: exact}]"], "train.grpo.rewards[0].fn=exact: no such "
     "reward; built-in: exact_answer, format, length, reward_model, or your own as module:function or "
     "path/to/file.py:function"),
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
    p = qtune_warm(verb, *overrides)
    assert words in only_line(p), p.stderr


DEMO = str(REPO / "data" / "demo" / "captains_log.jsonl")
PAIRS = str(REPO / "data" / "demo" / "preferences.jsonl")
TRAIN = ["model=tiny_qwen3", f"data.path={DEMO}"]
HELD_OUT = str(REPO / "data" / "demo" / "held_out.jsonl")
TINY_RUN = ["model=tiny_qwen3", "data=demo", f"data.path={DEMO}", f"data.eval_path={HELD_OUT}",  # as tiny_run trained
            "train.grad_accum=1", "train.report_to=[]"]
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


def _data_changed_in_place(tmp, run):
    """The run copy, resumable, as if trained on {tmp}/d.jsonl, whose contents then changed."""
    import yaml

    lines = Path(DEMO).read_text().splitlines(keepends=True)
    (tmp / "d.jsonl").write_text("".join(lines[:-1]))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["path"] = str(tmp / "d.jsonl")
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    _resumable()(tmp, run)


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


def _model_without_weights(tmp, run):
    """The run's base copied to {tmp}/m without its weights file (as if deleted), and the run pointed at the copy."""
    import yaml

    shutil.copytree(Path(os.environ["QTUNE_HOME"]) / "models" / "tiny_qwen3", tmp / "m")
    (tmp / "m" / "model.safetensors").unlink()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["local_dir"] = str(tmp / "m")
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


def _lf(entries: dict, files: dict):
    """A dataset_info.json of these entries and the files they name, in {tmp}."""
    import json

    def make(tmp, run):
        (tmp / "dataset_info.json").write_text(json.dumps(entries))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
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
    ("prepare", ["model=tiny_qwen3", "data.path={tmp}/d.jsonl"], "d.jsonl:2: messages[1].tool_calls[0]: the arguments "
     "of the call to 'w' are not JSON (Expecting property name enclosed in double quotes at column 2): '{city: 1}'",
     _write("d.jsonl", b'{"input": "a", "output": "b"}\n{"messages": [{"role": "user", "content": "Weather?"}, '
                       b'{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": '
                       b'{"name": "w", "arguments": "{city: 1}"}}]}]}\n')),
    # LLaMA-Factory's dataset_info.json
    ("prepare", ["data.dataset_info={tmp}/dataset_info.json", "data.dataset=alpaca_en"],
     "/dataset_info.json; valid: pairs, sft",
     _write("dataset_info.json", b'{"pairs": {"file_name": "p.json", "ranking": true}, "sft": {"file_name": "s.json"}}')),
    ("prepare", ["model=tiny_qwen3", "data.dataset_info={tmp}/dataset_info.json", "data.dataset=sft"],
     "/dataset_info.json maps columns.prompt to field 'question', which this record lacks (its fields: "
     "instruction, output)",
     _lf({"sft": {"file_name": "s.json", "columns": {"prompt": "question", "response": "answer"}}},
         {"s.json": b'[{"instruction": "q", "output": "a"}]'})),
    ("prepare", ["model=tiny_qwen3", "data.dataset_info={tmp}/dataset_info.json", "data.dataset=pairs"], "is a ranking "
     "dataset (ranking: true, preference pairs): it trains with train.stage=dpo, rm or kto, not sft",
     _lf({"pairs": {"file_name": "p.json", "ranking": True}},
         {"p.json": b'[{"instruction": "q", "chosen": "a", "rejected": "b"}]'})),
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
    ("eval", ["run={run}", "eval.lm_eval.tasks=[tiny_qa]", "eval.lm_eval.include_path={tmp}/tasks"],
     "/tasks: no such folder (a folder of task yaml files)", lambda tmp, run: None),
    ("eval", ["run={rm}", "eval.lm_eval.tasks=[hellaswag]"], "rm is a reward model (train.stage=rm), which "
     "lm-eval's tasks cannot score", lambda tmp, run: None),
    # a run without what `qtune push` is asked to upload: one line before any request
    ("push", ["run={run}", "hub.repo_id=me/x", "hub.what=merged"], "/merged does not exist; run `qtune merge run=",
     lambda tmp, run: None),
    ("push", ["run={run}", "hub.repo_id=me/x", "hub.what=gguf"], "/gguf; make them with `qtune merge run=",
     lambda tmp, run: None),
    ("push", ["run={run}", "hub.repo_id=me/x", "hub.what=merged"], "merged/model.safetensors is damaged (truncated: "
     "5,000 of", _merged),
    # a run folder that is not one
    ("chat", ["run={tmp}", "--prompt", "hi"], "tmp: no adapter/ there (finish or resume `qtune train` first)",
     lambda tmp, run: None),
    ("serve", ["run={tmp}/f"], "f is a file; name a run folder", _write("f", b"x")),
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
    # a base model folder that lost its weights
    ("chat", ["run={run}", "--prompt", "hi"], "m is incomplete (no weights: model.safetensors is missing); make it "
     "again with `qtune download model=tiny_qwen3 model.local_dir=", _model_without_weights),
    ("eval", ["run={run}"], "m is incomplete (no weights: model.safetensors is missing); make it again with `qtune "
     "download model=tiny_qwen3", _model_without_weights),
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
    # a resume on other examples than the run's (qtune.runs.check_same_data): other settings, other files, or the
    # same files changed in place (the prepared data's digest)
    ("train", [*TINY_RUN, "train.output_dir={run}", "train.max_steps=2", "data.max_length=128"],
     "was trained on other examples: data.max_length=128 (was 256); resume with the data it was trained on, or start "
     "a new run: another train.output_dir (or run_name=...), or train.overwrite=true to replace this one", _resumable()),
    ("train", [*TINY_RUN, "data.path={tmp}/d.jsonl", "data.system_prompt=Be brief.", "train.output_dir={run}",
               "train.max_steps=2"],
     "was trained on other examples: data.path=", _resumable(_write("d.jsonl", b'{"input": "a", "output": "b"}\n'))),
    ("train", [*TINY_RUN, "data.path={tmp}/d.jsonl", "train.output_dir={run}", "train.max_steps=2"],
     "d.jsonl: the data changed since", _data_changed_in_place),
    # a finished run asked for more steps: how to go on with it (train.resume=continue), not only how to discard it
    ("train", [*TINY_RUN, "train.output_dir={run}", "train.max_steps=4"],
     "holds a finished run (adapter/, 2 steps); to train it on to train.max_steps=4 from its last checkpoint set "
     "train.resume=continue; to keep it and start another choose another train.output_dir", lambda tmp, run: None),
    ("train", [*TINY_RUN, "train.output_dir={run}", "train.max_steps=2", "train.resume=continue"],
     "already trained 2 steps and train.max_steps=2 asks for no more; set a larger train.max_steps",
     lambda tmp, run: None),
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
    args = [o.replace("{tmp}", str(tmp)).replace("{run}", str(run)).replace("{rm}", str(rm)) for o in overrides]
    try:
        if getattr(make, "read_only", False):  # another user's rights: a fresh process under setpriv
            return qtune(verb, *args, cwd=tmp_path, prefix=NOT_ALL_POWERFUL)
        return qtune_warm(verb, *args, cwd=tmp_path)
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


PUSH_CASES = [  # against the local Hub server (tests/hubserver.py); only hf_write may write, and only to me/*
    ("", "me/x", "error: no Hugging Face token: set HF_TOKEN to a write token (https://huggingface.co/settings/tokens) "
     "or run `hf auth login`"),
    ("hf_read", "me/x", "error: hub.repo_id=me/x: the token may not write there (403 Forbidden: You don't have the "
     "rights to create a model under the namespace \"me\"); use a write token of me (or of a member with write "
     "access), or push to a repo of your own"),
    ("hf_write", "someone-else/x", "error: hub.repo_id=someone-else/x: the token may not write there (403 Forbidden"),
    ("hf_write", "me/x offline", "error: HF_HUB_OFFLINE=1: qtune push needs the Hub; unset HF_HUB_OFFLINE"),
    ("hf_write", "me/busy", "error: hub.repo_id=me/busy already holds other files (notes.txt); push to a new repo, or "
     "set hub.overwrite=true to replace its contents"),
]


@pytest.mark.parametrize("token,repo_id,words", PUSH_CASES, ids=[f"{c[0] or 'no-token'}:{c[1]}" for c in PUSH_CASES])
def test_a_push_the_hub_would_refuse_is_one_line(token, repo_id, words, tiny_run, tmp_path):
    from hubserver import FakeHub

    repo_id, _, offline = repo_id.partition(" ")
    with FakeHub(writers={"hf_write": {"me"}}) as hub:
        busy = hub.repo("me/busy").add_commit({".gitattributes": b"", "notes.txt": b"mine"})
        p = qtune("push", f"run={tiny_run}", f"hub.repo_id={repo_id}", cwd=tmp_path,
                  env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_XET": "1",
                       "HF_TOKEN": token, "HF_HOME": str(tmp_path / "hf")})
        assert words in only_line(p), p.stderr
        assert set(hub.repos) == {"me/busy"} and hub.repos["me/busy"].refs == {"main": busy}  # nothing made or changed
        assert not [r for r in hub.log if r["method"] == "PUT"]                             # nothing sent


def test_good_values_at_the_edges_compose():
    from qtune.config import compose, to_object

    cfg = to_object(compose(["data.val_size=200", "chat.temperature=0", "serve.port=65535", "chat.top_p=1",
                             "moe.max_experts=1"]))
    assert cfg.serve.port == 65535 and cfg.moe.max_experts == 1 and cfg.data.val_size == 200
    assert to_object(compose(["data.val_size=0"])).data.val_size == 0
    adapters = to_object(compose(["serve.adapters={b: runs/b, c: /adapters/c}"])).serve.adapters
    assert adapters == {"b": "runs/b", "c": "/adapters/c"}


# ---------------------------------------------------------------- a sweep with an invalid job


def test_a_sweeps_invalid_job_is_a_row_with_its_error_and_the_others_run(tmp_path, tiny_qwen3):
    sweep = tmp_path / "sweep"
    p = qtune_warm("train", "-m", *TRAIN, "data.max_length=256", "train.grad_accum=1", "train.report_to=[]",
                   "train.max_steps=1", "train.lr=1e-4,-1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: job 1 (") and \
        errors[0].endswith("train.lr=-1): train.lr=-1: valid: > 0"), p.stderr
    import csv

    rows = {r["overrides"]: r for r in csv.DictReader(open(sweep / "summary.csv"))}
    assert rows.keys() == {"train.lr=0.0001", "train.lr=-1"}, rows
    assert rows["train.lr=0.0001"]["train_loss"] and not rows["train.lr=0.0001"]["error"]
    assert rows["train.lr=-1"]["error"] == "train.lr=-1: valid: > 0" and not rows["train.lr=-1"]["train_loss"]
    assert "| train.lr=-1: valid: > 0 |" in (sweep / "summary.md").read_text()
    assert (sweep / "0" / "adapter" / "adapter_config.json").is_file() and not (sweep / "1" / "adapter").exists()


@pytest.mark.parametrize("overrides,words", [
    ([], "no training data: set data.path="),
    (["data.path={tmp}/chats.jsonl"], "chats.jsonl: no such file, folder or glob match"),
    (["model=tiny_qwen3", "model.source=local", "model.local_dir={tmp}/no-model", f"data.path={DEMO}"],
     "no-model: no config.json there"),
], ids=["no-data", "missing-file", "missing-model"])
def test_what_every_job_of_a_sweep_shares_is_checked_once_before_any_folder(tmp_path, overrides, words):
    """The documented sweep without data.path: one line, no job started, no sweep folder left behind."""
    p = qtune_warm("train", "-m", "lora=r16,r64", "train.lr=1e-4,2e-4", *[o.format(tmp=tmp_path) for o in overrides],
                   cwd=tmp_path)
    assert words in only_line(p) and "error: job" not in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()


def test_a_sweep_over_the_data_checks_each_jobs_data_itself(tmp_path):
    """data.path swept: not one shared input, so the sweep goes on to its jobs (a dry run: nothing trains)."""
    p = qtune_warm("train", "-m", "--dry-run", "model=tiny_qwen3", f"data.path={DEMO},{tmp_path}/other.jsonl",
                   cwd=tmp_path)
    assert "no training data" not in p.stderr, p.stderr


# ---------------------------------------------------------------- an adapter of another base


@pytest.fixture(scope="module")
def narrow_run(tiny_qwen3, tmp_path_factory) -> Path:
    """An adapter of another base: a run of a tiny Qwen3 half as wide as tiny_qwen3 (hidden_size 32, not 64)."""
    folder = tmp_path_factory.mktemp("narrow")
    qtune_warm("train", "model=tiny_qwen3", "model.arch.hidden_size=32", "model.arch.intermediate_size=64",
               f"model.local_dir={folder / 'base'}", f"data.path={DEMO}", "data.max_length=256", "train.grad_accum=1",
               "train.max_steps=1", "train.report_to=[]", f"train.output_dir={folder / 'run'}", check=True)
    return folder / "run"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moved_base(tmp, narrow):
    """narrow's adapter alone, its base_model_name_or_path a folder that is not on this machine: only the load can
    tell that it does not fit."""
    import json

    shutil.copytree(narrow / "adapter", tmp / "b")
    config = json.loads((tmp / "b" / "adapter_config.json").read_text())
    (tmp / "b" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/elsewhere/narrow"}))


OTHER_BASE = [
    ("serve", ["serve.adapters={b: {narrow}}"], "serve.adapters.b: {narrow} was trained on tiny_qwen3 ({narrow_base}), "
     "but the base loaded here is tiny_qwen3 ({base}): hidden_size 32 vs 64; an adapter fits only the base it was "
     "trained on: use it with run={narrow}", None),
    ("eval", ["eval.models=[adapter,{narrow}]"], "eval.models: {narrow} was trained on tiny_qwen3 ({narrow_base}), but "
     "the base loaded here is tiny_qwen3 ({base}): hidden_size 32 vs 64", None),
    ("serve", ["serve.adapters={b: {tmp}/b}"], "serve.adapters.b: {tmp}/b was trained on /elsewhere/narrow, but the base "
     "loaded here is tiny_qwen3 ({base}): ", _moved_base),
]


@pytest.mark.parametrize("verb,overrides,words,make", OTHER_BASE, ids=[f"{c[0]}:{c[2][:40]}" for c in OTHER_BASE])
def test_an_adapter_of_another_base_is_one_line_naming_both_bases(verb, overrides, words, make, tiny_run, narrow_run,
                                                                  tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    if make:
        make(tmp, narrow_run)
    names = {"{narrow}": str(narrow_run), "{narrow_base}": str(narrow_run.parent / "base"), "{tmp}": str(tmp),
             "{base}": str(Path(os.environ["QTUNE_HOME"]) / "models" / "tiny_qwen3")}

    def fill(text: str) -> str:
        for k, v in names.items():
            text = text.replace(k, v)
        return text

    port = [f"serve.port={_free_port()}"] if verb == "serve" else []
    line = only_line(qtune_warm(verb, f"run={tiny_run}", *port, *[fill(o) for o in overrides], cwd=tmp_path))
    assert fill(words) in line, line
    if make:  # what PEFT says in a line per tensor, as one: a tensor of each shape
        assert "is [16, 32] in the adapter, [16, 64] in this base; an adapter fits only the base it was trained on: " \
               "use it over that base" in line, line


# ---------------------------------------------------------------- a full disk


@pytest.fixture()
def small_disk(tmp_path):
    """mount(size): a tmpfs of that size at tmp_path/disk (mounted again at a new size when called again); unmounted
    after the test. Needs root (or CAP_SYS_ADMIN): skipped elsewhere."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        args = ["-o", f"remount,size={size}", str(disk)] if mounted else ["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)]
        p = subprocess.run(["mount", *args], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(size)
        return disk

    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)


def _needs_and_free(line: str) -> tuple[float, float]:
    import re

    m = re.search(r"it needs about ([\d.]+) MiB, ([\d.]+) MiB free in ", line)
    assert m, line
    return float(m.group(1)), float(m.group(2))


@pytest.mark.slow
def test_a_merge_onto_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_disk, tiny_run, tmp_path):
    """The merged tiny Qwen3 takes 36.5 MiB (bf16 weights, tokenizer): a 60 MiB disk holds one, not a second beside it."""
    disk = small_disk("60m")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    qtune("merge", f"run={run}", f"merge.output_dir={disk / 'merged'}", check=True)
    before = {f.name: f.stat().st_size for f in (disk / "merged").iterdir()}
    line = only_line(qtune("merge", f"run={run}", f"merge.output_dir={disk / 'merged'}"))
    assert line.startswith(f"error: no space left on device writing {disk / 'merged'}: it needs about "), line
    assert line.endswith(f"free in {disk}; nothing half-written was left; the previous merged is kept as it was; "
                         "free space, or set merge.output_dir to a folder on another disk"), line
    need, free = _needs_and_free(line)
    assert 36 < need < 37 and free < need, line
    assert [p.name for p in disk.iterdir()] == ["merged"]           # no temporary folder left
    assert {f.name: f.stat().st_size for f in (disk / "merged").iterdir()} == before
    from qtune import integrity

    integrity.check_model(disk / "merged", "")


@pytest.mark.slow
def test_a_checkpoint_onto_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(small_disk, tiny_qwen3):
    """A checkpoint of the tiny Qwen3 takes 18.2 MiB (the tokenizer's 17.8): a 30 MiB disk holds the first, not the
    second; the half-written one is removed, and with room the same command resumes from the first."""
    disk = small_disk("30m")
    args = ["train", *TRAIN, "data.max_length=256", "train.grad_accum=1", "train.report_to=[]", "train.max_steps=3",
            "train.save_steps=1", f"train.output_dir={disk / 'run'}"]
    line = one_line_error(qtune(*args))
    checkpoints = disk / "run" / "checkpoints"
    assert line.startswith(f"error: no space left on device saving {checkpoints / 'checkpoint-2'}: it needs about "), line
    assert line.endswith(f"free in {disk / 'run'}; the half-written checkpoint-2 was removed; free space and run the "
                         "same command again (it resumes from checkpoint-1)"), line
    need, free = _needs_and_free(line)
    assert 18 < need < 19 and free < need, line
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1"]
    small_disk("100m")
    p = qtune(*args, check=True)
    assert f"resuming from {checkpoints / 'checkpoint-1'}" in p.stdout + p.stderr
    assert (disk / "run" / "adapter" / "adapter_model.safetensors").is_file()
