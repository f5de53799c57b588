"""`qtune chat` in a real terminal (pexpect) and `qtune serve` for real (uvicorn on a free port) queried
with the `openai` client, both over SmolLM2 trained on the demo data (its adapter answers "Captain's log: …")."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import QTUNE, only_line, qtune_warm


@pytest.mark.slow
def test_chat_in_a_terminal(smol_run, tmp_path):
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "qtune", "chat", f"run={smol_run}", "chat.use=adapter",
                                           "chat.temperature=0", "chat.max_new_tokens=40"],
                          cwd=str(tmp_path), encoding="utf-8", timeout=180, dimensions=(40, 200),
                          # Ctrl-C as a terminal delivers it, whatever this process inherited (a shell's background job
                          # runs with SIGINT ignored, and an ignored signal stays ignored across exec)
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(">>> ")
    child.sendline("What is the capital of Italy?")
    child.expect_exact("Captain's log")
    first = time.time()
    child.expect_exact("End of entry.")
    assert time.time() - first > 0.2  # the answer arrived token by token, not at once
    child.expect_exact(">>> ")
    child.sendline("And how many legs does a spider have?")  # a second turn, with history
    child.expect_exact("Captain's log")
    child.expect_exact(">>> ")
    child.sendline("/save conversation.json")
    child.expect_exact("saved 4 messages")
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect_exact("conversation cleared")
    child.expect_exact(">>> ")
    child.sendline("/system You answer in French.")
    child.expect_exact("system prompt set")
    child.expect_exact(">>> ")
    child.sendline("Write a long story about the sea and the stars.")
    child.expect_exact("\r\n")  # past the terminal's echo of the line
    child.expect(r"\w{3,}")  # the answer has started
    child.sendintr()  # Ctrl-C stops the answer, not the session
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    child.sendeof()  # Ctrl-D exits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "conversation.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][1]["content"].startswith("Captain's log")


@pytest.mark.slow
def test_chat_prompt_answers_once(smol_run):
    p = subprocess.run([*QTUNE, "chat", f"run={smol_run}", "chat.use=adapter", "chat.temperature=0",
                        "chat.max_new_tokens=30", "--prompt", "What is the capital of Italy?"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith("Captain's log") and "Rome" in p.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smol_run):
    port = _free_port()
    proc = subprocess.Popen([*QTUNE, "serve", f"run={smol_run}", f"serve.port={port}", "serve.api_key=sesame",
                             "chat.max_new_tokens=24", "serve.max_tokens_limit=64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"qtune serve did not start:\n{proc.stdout.read()}")
            time.sleep(0.5)
    yield url, smol_run.name
    proc.terminate()
    proc.wait(timeout=30)


def _post(url: str, body: bytes, key: str | None = "sesame"):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json",
                                                                           **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_serve_answers_openai_clients(server):
    import openai

    url, adapter = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="sesame")
    assert [m.id for m in client.models.list().data] == ["smollm2_135m", adapter]

    ask = [{"role": "user", "content": "What is the capital of Italy?"}]
    tuned = client.chat.completions.create(model=adapter, messages=ask, temperature=0)
    base = client.chat.completions.create(model="smollm2_135m", messages=ask, temperature=0)
    assert tuned.choices[0].message.content.startswith("Captain's log")  # the adapter, chosen per request
    assert not base.choices[0].message.content.startswith("Captain's log")
    assert tuned.usage.completion_tokens > 0 and tuned.usage.prompt_tokens > 0

    stream = client.chat.completions.create(model=adapter, messages=ask, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == tuned.choices[0].message.content

    text = client.completions.create(model="smollm2_135m", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert text.choices[0].text.strip()

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
    status, body = _post(url + "/v1/chat/completions", b'{"model": "x", "messages": [}')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = _post(url + "/v1/chat/completions", json.dumps({"model": adapter}).encode())
    assert status == 400 and "messages" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", json.dumps({"model": "nope", "messages": ask}).encode())
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = _post(url + "/v1/chat/completions", json.dumps({"model": adapter, "messages": ask,
                                                                    "max_tokens": 10_000}).encode())
    assert status == 400 and "serve.max_tokens_limit" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", b"{}", key=None)
    assert status == 401


@pytest.mark.slow
def test_serve_answers_eight_concurrent_clients(server):
    import openai

    url, adapter = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", timeout=300)
    questions = ["What is the capital of Italy?", "How many legs does a spider have?", "What color is the sky?",
                 "Name a planet.", "What is two plus three?", "What do bees make?", "How many days in a week?",
                 "What is ice made of?"]
    answers: dict[int, str] = {}

    def ask(i: int, into: dict):
        model = adapter if i % 2 == 0 else "smollm2_135m"
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=6, stream=i % 3 == 0,
                                           messages=[{"role": "user", "content": questions[i]}])
        into[i] = ("".join(c.choices[0].delta.content or "" for c in r if c.choices) if i % 3 == 0
                   else r.choices[0].message.content)

    alone: dict[int, str] = {}
    for i in range(8):  # one at a time first: what each (model, question) answers at temperature 0
        ask(i, alone)
    threads = [threading.Thread(target=ask, args=(i, answers)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(answers) == list(range(8)) and all(answers[i].strip() for i in range(8))
    assert answers == alone  # all answered, and each request kept its own model/adapter
    assert answers[0].startswith("Captain's log")


@pytest.mark.slow
def test_merge_exports_gguf_and_a_4bit_checkpoint(smol_merged):
    """GGUF f16/q8_0 written with the gguf package, q4_k_m with qtune's k-quants, each loaded back by transformers'
    GGUF loader (inside qtune merge, which fails below its agreement bar); the nf4 checkpoint loads and generates."""
    out = smol_merged
    info = json.loads((out / "qtune_merge.json").read_text())
    by_type = {g["type"]: g for g in info["gguf"]}
    assert by_type["f16"]["top1_agreement"] >= 0.98 and by_type["q8_0"]["top1_agreement"] >= 0.8
    assert by_type["q4_k_m"]["top1_agreement"] >= 0.75
    gguf_dir = out.parent / "gguf"  # beside merged/, which a new merge replaces
    assert (gguf_dir / "merged-f16.gguf").stat().st_size > 1.8 * (gguf_dir / "merged-q8_0.gguf").stat().st_size
    assert (gguf_dir / "merged-q8_0.gguf").stat().st_size > 1.3 * (gguf_dir / "merged-q4_k_m.gguf").stat().st_size
    import gguf

    reader = gguf.GGUFReader(str(gguf_dir / "merged-q8_0.gguf"))
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q8_0", "F32"}
    # q4_k_m as llama.cpp mixes it for SmolLM2 (rows of 576 are no multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(gguf_dir / "merged-q4_k_m.gguf")).tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q5_0"
    assert (types["blk.0.ffn_down.weight"], types["blk.3.ffn_down.weight"]) == ("Q6_K", "Q4_K")
    assert (types["blk.0.attn_v.weight"], types["blk.3.attn_v.weight"]) == ("Q8_0", "Q5_0")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    four = AutoModelForCausalLM.from_pretrained(info["bnb_4bit"])
    assert type(four.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    tok = AutoTokenizer.from_pretrained(info["bnb_4bit"])
    ids = four.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert ids.shape[1] > 1


@pytest.mark.slow
def test_a_second_merge_keeps_the_first_ones_gguf_and_its_modelfile(smol_merged, tmp_path):
    """GGUF files live in <run>/gguf/, beside merged/: merging again (without merge.gguf) keeps them; each has an Ollama
    Modelfile that names it, the ChatML turns in Ollama's template syntax and the stop tokens."""
    import shutil

    from conftest import qtune_warm

    run = tmp_path / "run"
    shutil.copytree(smol_merged.parent, run)  # merged once with merge.gguf=[f16,q8_0] (conftest)
    gguf_file, modelfile = run / "gguf" / "merged-f16.gguf", run / "gguf" / "merged-f16.Modelfile"
    assert gguf_file.is_file() and (run / "gguf" / "merged-q8_0.Modelfile").is_file()
    size = gguf_file.stat().st_size
    qtune_warm("merge", f"run={run}", check=True, timeout=900)
    assert gguf_file.stat().st_size == size and (run / "merged" / "model.safetensors").is_file()
    assert not list((run / "gguf").glob(".*"))  # no temporaries left
    lines = modelfile.read_text().splitlines()
    assert "FROM ./merged-f16.gguf" in lines and (modelfile.parent / "merged-f16.gguf").is_file()
    text = modelfile.read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "{{ .System }}" in template and "{{- range .Messages }}" in template
    assert '{{- if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>' in template
    assert template.endswith("<|im_start|>assistant\n")
    assert {l for l in lines if l.startswith("PARAMETER stop")} >= {'PARAMETER stop "<|im_end|>"',
                                                                    'PARAMETER stop "<|im_start|>"'}


def test_qwen3_moe_gguf_in_llama_cpp_layout_loads_back(tmp_path, tiny_qwen3_moe):
    """Qwen3-MoE to GGUF (llama.cpp's qwen3moe): fused gate_up split into ffn_gate_exps / ffn_up_exps, the router in
    f32, the expert counts and sizes in the metadata; transformers' GGUF loader reads it back to the same next tokens."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.export.gguf import export, verify

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_moe)
    inputs = [dict(tok("The captain's log, day nine: the ship turned north again and the crew", return_tensors="pt"))]
    for qtype, least in (("f16", 0.98), ("q8_0", 0.8), ("q4_k_m", 0.6)):
        path = export(model, tok, tmp_path / f"moe-{qtype}.gguf", qtype)
        assert verify(path, model, tok, inputs)["top1_agreement"] >= least
    reader = gguf.GGUFReader(str(tmp_path / "moe-f16.gguf"))
    fields = {k: f.parts[f.data[0]][0] for k, f in reader.fields.items() if k.startswith("qwen3moe.expert")}
    assert fields == {"qwen3moe.expert_count": 8, "qwen3moe.expert_used_count": 2,
                      "qwen3moe.expert_feed_forward_length": 32}, fields
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    assert tensors["blk.0.ffn_gate_exps.weight"] == ((64, 32, 8), "F16")   # GGUF lists dims innermost first
    assert tensors["blk.0.ffn_up_exps.weight"] == ((64, 32, 8), "F16")
    assert tensors["blk.0.ffn_down_exps.weight"] == ((32, 64, 8), "F16")
    assert tensors["blk.0.ffn_gate_inp.weight"] == ((64, 8), "F32")
    up = next(t for t in reader.tensors if t.name == "blk.1.ffn_up_exps.weight")
    assert torch.equal(torch.from_numpy(up.data.copy()).float(),
                       model.model.layers[1].mlp.experts.gate_up_proj.detach()[:, 32:, :].half().float())
    assert gate_up.shape == (8, 64, 64)
    # q4_k_m of an 8-expert model: attn_k / attn_v in Q8_0, the router in f32; rows of 64 and 32 fall back from Q4_K to
    # Q5_0 (and q4_k_m's Q5_K attn_output to Q5_1)
    k = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "moe-q4_k_m.gguf")).tensors}
    assert (k["blk.1.attn_k.weight"], k["blk.1.attn_v.weight"], k["blk.1.ffn_gate_inp.weight"]) == ("Q8_0", "Q8_0", "F32")
    assert (k["blk.1.attn_q.weight"], k["blk.1.attn_output.weight"]) == ("Q5_0", "Q5_1")
    assert k["blk.1.ffn_up_exps.weight"] == "Q5_0"  # and ffn_down in Q6_K in the last eighth of the layers -> Q8_0
    assert (k["blk.0.ffn_down_exps.weight"], k["blk.1.ffn_down_exps.weight"]) == ("Q5_0", "Q8_0")


def test_gguf_refusals_are_one_line(tmp_path):
    from qtune.errors import ConfigError
    from qtune.export.gguf import export

    class Cfg:
        model_type = "mixtral"

    class M:
        config = Cfg()

    with pytest.raises(ConfigError, match="mixtral models cannot be exported to GGUF"):
        export(M(), None, tmp_path / "x.gguf", "f16")
    with pytest.raises(ConfigError, match="merge.gguf=q9: valid: f16, q8_0, q4_k_m, q5_k_m, q6_k"):
        export(M(), None, tmp_path / "x.gguf", "q9")
    with pytest.raises(ConfigError, match=r"merge.gguf=Q4_K_M: write it in lower case \(q4_k_m\)"):
        export(M(), None, tmp_path / "x.gguf", "Q4_K_M")
    # the gguf package has no quantizer for Q4_K (qtune.export.kquants has); the other k-quant mixes are
    # llama.cpp's llama-quantize's
    import gguf
    import numpy as np

    with pytest.raises(NotImplementedError):
        gguf.quants.quantize(np.ones((1, 256), np.float32), gguf.GGMLQuantizationType.Q4_K)
    with pytest.raises(ConfigError, match=r"merge.gguf=q4_k_s: qtune writes the k-quant mixes q4_k_m, q5_k_m and q6_k; "
                                          r"for this one export merge.gguf=\[f16\] and run `llama-quantize "
                                          r"<run>/gguf/merged-f16.gguf merged-q4_k_s.gguf Q4_K_S`"):
        export(M(), None, tmp_path / "x.gguf", "q4_k_s")


@pytest.mark.slow
def test_health_names_no_models_behind_a_key(server):
    url, _ = server
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}


@pytest.mark.slow
def test_chat_save_makes_folders_asks_before_replacing_and_survives_any_failure(tiny_run, tmp_path):
    """/save into a folder that does not exist makes it; a path that cannot be written is one line and the session
    (with its conversation) goes on; an existing file is replaced only after a yes (y/N)."""
    import pexpect

    (tmp_path / "afile").write_text("a file")
    (tmp_path / "mine.json").write_text("mine")
    child = pexpect.spawn(sys.executable, ["-m", "qtune", "chat", f"run={tiny_run}", "chat.use=adapter",
                                           "chat.temperature=0", "chat.max_new_tokens=3"],
                          cwd=str(tmp_path), encoding="utf-8", timeout=180, dimensions=(40, 250))
    child.expect_exact(">>> ")
    child.sendline("Hello")
    child.expect_exact(">>> ")
    child.sendline("/save afile/chat.json")  # under a file: no folder can be made
    child.expect_exact("error:")  # (in red: the rest of the line follows its colour codes)
    child.expect_exact(" /save afile/chat.json: not saved (afile is a file, so no folder can be made under it); "
                       "the conversation is kept")
    child.expect_exact(">>> ")
    child.sendline("/save /proc/qtune/chat.json")  # a folder that cannot be made
    child.expect_exact("error:")
    child.expect_exact(" /save /proc/qtune/chat.json: not saved (")
    child.expect_exact(">>> ")
    child.sendline("/save new/deeper/chat.json")
    child.expect_exact("saved 2 messages to new/deeper/chat.json")
    child.expect_exact(">>> ")
    child.sendline("/save mine.json")
    child.expect_exact("mine.json exists; replace it? [y/N] ")
    child.sendline("")  # Enter: no
    child.expect_exact("not saved; mine.json is unchanged")
    child.expect_exact(">>> ")
    child.sendline("And again?")
    child.expect_exact(">>> ")
    child.sendline("/save mine.json")
    child.expect_exact("replace it? [y/N] ")
    child.sendline("y")
    child.expect_exact("saved 4 messages to mine.json")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "afile").read_text() == "a file"
    assert len(json.loads((tmp_path / "new" / "deeper" / "chat.json").read_text())["messages"]) == 2
    assert [m["role"] for m in json.loads((tmp_path / "mine.json").read_text())["messages"]] == \
        ["user", "assistant", "user", "assistant"]


def test_moe_adapters_that_adapt_other_parameters_are_refused_in_one_line(tiny_run, tmp_path):
    """Adapters with LoRA on other Qwen3-MoE parameters (another moe.scope) cannot share one PEFT model: one line
    naming the adapter and both parameter lists, before the base loads."""
    import shutil

    for name, params in (("experts", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), ("router", ["mlp.gate.weight"])):
        shutil.copytree(tiny_run, tmp_path / name)
        path = tmp_path / name / "adapter" / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "target_parameters": params}))
    p = qtune_warm("serve", f"run={tmp_path / 'experts'}", f"serve.adapters={{r: {tmp_path / 'router' / 'adapter'}}}",
                   f"serve.port={_free_port()}")
    line = only_line(p)
    assert p.returncode != 0
    assert line == ("error: serve.adapters.r: its adapter's LoRA on Qwen3-MoE parameters (mlp.gate.weight) differs "
                    "from experts's (mlp.experts.down_proj, mlp.experts.gate_up_proj); one model holds such adapters "
                    "only when they adapt the same parameters (trained with the same moe.scope): serve the others "
                    "from another qtune serve"), line
