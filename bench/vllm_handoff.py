"""`qtune serve serve.engine=vllm` against a real vLLM, end to end: two LoRA adapters trained by `qtune train` on the
embedded SmolLM2-135M (or the runs given), `qtune serve` handing them to vLLM's OpenAI server, the base and each
adapter asked with the openai client (chat completions, streamed and not, at temperature 0), a wrong key refused,
and SIGTERM ending the server. Prints what came back and how long each part took; exits non-zero on any failure.

    python bench/vllm_handoff.py --vllm /opt/vllm-venv/bin/vllm            # trains runs/a and runs/b under --out
    python bench/vllm_handoff.py --vllm /opt/vllm-venv --runs a=runs/x b=runs/y

vLLM lives in its own environment (--vllm: its `vllm` executable or the environment; default: $QTUNE_VLLM, else the
`vllm` on PATH). On vLLM's CPU build the server's cache gets --kv 1G (its default reserves 92% of memory).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

QTUNE = [sys.executable, "-m", "qtune"]
REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of Italy?"
# a: every linear layer, trained until it answers in the demo's Captain's-log style; b: rank 8 on q/v, a few steps
TRAIN = {
    "a": ["train.max_steps=8", "train.warmup_ratio=0", "train.lr=1e-3"],
    "b": ["train.max_steps=3", "lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj,v_proj]"],
}


def train(out: Path) -> dict[str, Path]:
    runs = {}
    for name, extra in TRAIN.items():
        t = time.time()
        folder = out / "runs" / name
        p = subprocess.run([*QTUNE, "train", "model=smollm2_135m", "data=demo", "train=demo", f"train.output_dir={folder}",
                            "train.overwrite=true", "train.report_to=[]", "train.sample_prompts=[]", "train.eval_steps=0",
                            "train.save_steps=100", *extra], cwd=out, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"qtune train ({name}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        print(f"trained {name} in {time.time() - t:.0f} s: {folder}", flush=True)
        runs[name] = folder
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> float:
    t = time.time()
    while time.time() - t < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}) before it answered")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.time() - t
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"no answer on {url}/health after {timeout:.0f} s")


def ask(client, model: str, stream: bool) -> dict:
    t = time.time()
    r = client.chat.completions.create(model=model, temperature=0, max_tokens=24, stream=stream,
                                       messages=[{"role": "user", "content": QUESTION}])
    if stream:
        pieces = [c.choices[0].delta.content or "" for c in r if c.choices]
        return {"model": model, "stream": True, "seconds": round(time.time() - t, 2), "chunks": len(pieces),
                "text": "".join(pieces)}
    return {"model": model, "stream": False, "seconds": round(time.time() - t, 2),
            "completion_tokens": r.usage.completion_tokens, "text": r.choices[0].message.content}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm", default=os.environ.get("QTUNE_VLLM"), help="vLLM's `vllm` executable or its environment")
    ap.add_argument("--runs", nargs=2, metavar="NAME=RUN", help="two run folders to serve instead of training them")
    ap.add_argument("--out", default="/tmp/qtune-vllm-handoff", help="where the runs are trained and the log kept")
    ap.add_argument("--kv", default="1G", help="the KV cache on vLLM's CPU build (--kv-cache-memory-bytes)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server")
    args = ap.parse_args()

    import openai

    from qtune.inference.vllm import find

    install = find(args.vllm)
    if install is None:
        sys.exit("no vLLM: pass --vllm <its vllm executable or environment>, or set QTUNE_VLLM")
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "vllm": install.label(), "python": sys.version.split()[0]}),
          flush=True)
    runs = {k: Path(v).absolute() for k, v in (r.split("=", 1) for r in args.runs)} if args.runs else train(out)
    (first, run), (other, adapter) = list(runs.items())
    port, key = free_port(), "handoff-key"
    serve = [*QTUNE, "serve", f"run={run}", f"serve.adapters={{{other}: {adapter}}}", "serve.engine=vllm",
             f"serve.vllm_bin={install.exe}", f"serve.port={port}", f"serve.api_key={key}"]
    if install.cpu:
        serve.append(f"serve.vllm_args=[--kv-cache-memory-bytes,{args.kv}]")
    print("$ " + " ".join(serve[2:]), flush=True)
    log = open(out / "serve.log", "w")
    server = subprocess.Popen(serve, cwd=out, stdout=log, stderr=subprocess.STDOUT)
    failures, results, startup = [], [], None
    try:
        url = f"http://127.0.0.1:{port}"
        startup = wait_ready(url, server, args.timeout)
        print(f"ready after {startup:.0f} s", flush=True)
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=300)
        names = [m.id for m in client.models.list().data]
        print("models:", names, flush=True)
        base = next((n for n in names if n not in (first, other)), None)  # the base model's name
        if base is None or sorted(names) != sorted([base, first, other]):
            failures.append(f"/v1/models lists {names}, not {[base, first, other]}")
        for model in (base, first, other):
            for stream in (False, True):
                r = ask(client, model, stream)
                results.append(r)
                print(json.dumps(r), flush=True)
                if not r["text"].strip():
                    failures.append(f"{model} (stream={stream}) answered nothing")
            plain, streamed = results[-2]["text"], results[-1]["text"]
            if plain != streamed:
                failures.append(f"{model}: the streamed answer {streamed!r} differs from {plain!r}")
        if all(r["text"] == results[0]["text"] for r in results):
            failures.append("the adapters answer as the base does: no LoRA took effect")
        try:
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", timeout=60).models.list()
            failures.append("a wrong API key was accepted")
        except openai.AuthenticationError:
            pass
    except Exception as e:  # noqa: BLE001 (reported as a failure with the server's log)
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        t = time.time()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
            stopped = round(time.time() - t, 1)
        except subprocess.TimeoutExpired:
            server.kill()
            stopped = None
            failures.append("the server did not end within 60 s of SIGTERM")
        log.close()
    print(json.dumps({"startup_s": startup and round(startup, 1), "sigterm_exit_s": stopped,
                      "exit_code": server.returncode}), flush=True)
    if failures:
        tail = (out / "serve.log").read_text()[-3000:]
        print("\n".join(["handoff: FAILED", *failures, "--- serve.log (end) ---", tail]), flush=True)
        return 1
    print("handoff: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
