#!/usr/bin/env bash
# The demo: what qtune does today, end to end on the embedded SmolLM2-135M-Instruct (CPU, no network).
set -euo pipefail
export QTUNE_HOME=${QTUNE_HOME:-$PWD/.cache/demo-home}
step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }

step "qtune --help: the verbs"
qtune --help

step "Compose a QLoRA config for Qwen3-8B (nothing is loaded): qtune train --cfg model=qwen3_8b quant=nf4 lora=r64"
qtune train --cfg model=qwen3_8b quant=nf4 lora=r64 | head -30

step "A mistake fails at compose time, in one line"
qtune train quant=nf5 || true
