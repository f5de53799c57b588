"""Training stages (train.stage): the real CLI on SmolLM2 with the demo preference pairs (DPO, KTO and a reward model
learn what the pairs prefer, on held-out pairs they never saw; pt trains every token of raw text), exact DPO resume
after SIGKILL and stages chained with train.init_adapter on the tiny Qwen3, a DPO sweep's summary, the dry run's
accounting per stage, and DPO in nf4 on a GPU. Every command runs as `qtune` itself, forked from a process that has
imported the libraries (conftest's qtune_warm), except the one killed mid-run (a fresh process, test_train's kill_once)
and the GPU's (CUDA in a fresh process)."""
from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import REPO, only_line, qtune, qtune_warm
from test_train import adapter_tensors, kill_once, losses, metrics

PAIRS = [f"data.path={REPO}/data/demo/preferences.jsonl",
         f"data.eval_path={REPO}/data/demo/preferences_held_out.jsonl", "data.max_length=128"]
FAST = ["train.grad_accum=1", "train.logging_steps=1", "train.warmup_ratio=0", "train.report_to=[]",
        "train.gradient_checkpointing=false"]


def smol(stage: str, out, *extra: str) -> list[str]:
    return ["train", "model=smollm2_135m", f"train.stage={stage}", *PAIRS, *FAST, "train.batch_size=2",
            f"train.output_dir={out}", *extra]


def tiny(stage: str, out, *extra: str) -> list[str]:
    return ["train", "model=tiny_qwen3", f"train.stage={stage}", *PAIRS, *FAST, f"train.output_dir={out}", *extra]


def evals(run, key: str) -> dict[int, float]:
    """eval_<key> by step, from metrics.jsonl (step 0: the eval before the first step)."""
    return {r["step"]: r[f"eval_{key}"] for r in metrics(run) if f"eval_{key}" in r}


def eval_report(run, *overrides: str) -> dict:
    p = qtune_warm("eval", f"run={run}", *overrides)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads((run / "eval" / "summary.json").read_text())["models"]


# ---------------------------------------------------------------- SmolLM2: each stage learns (slow, end to end)


@pytest.mark.slow
def test_smollm2_dpo_prefers_the_chosen_answers_of_held_out_pairs(tmp_path, smollm2):
    """Reward accuracy: the share of held-out pairs whose chosen answer gets the higher implicit reward
    beta * log(policy / reference). Before the first step the policy is the reference: every reward is 0."""
    run = tmp_path / "dpo"
    p = qtune_warm(*smol("dpo", run, "train.max_steps=6", "train.save_steps=6", "train.eval_steps=3",
                         "train.lr=5e-4"))
    assert p.returncode == 0, p.stdout + p.stderr
    acc, margin = evals(run, "reward_accuracy"), evals(run, "reward_margin")
    assert sorted(acc) == [0, 3, 6], acc
    assert acc[0] == 0 and margin[0] == 0
    assert acc[6] >= 0.8 and 0 < margin[3] < margin[6], (acc, margin)
    assert all(math.isfinite(x) for x in losses(run).values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage"] == "dpo" and summary["eval_reward_accuracy"] == acc[6]
    assert (run / "loss.png").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()

    # qtune eval measures the same thing itself (the base, adapter off, as the reference): TRL's figures, recomputed
    report = eval_report(run)
    assert report["base"]["reward_accuracy"] is None  # the reference has no reward of its own
    assert report["adapter"]["reward_accuracy"] == acc[6]
    assert abs(report["adapter"]["reward_margin"] - margin[6]) <= 1e-3 * margin[6], (report, margin)


@pytest.mark.slow
def test_smollm2_kto_moves_its_rewards_apart(tmp_path, smollm2):
    run = tmp_path / "kto"
    p = qtune_warm(*smol("kto", run, "train.max_steps=6", "train.save_steps=6", "train.lr=5e-4",
                         "data.max_eval_samples=6"))
    assert p.returncode == 0, p.stdout + p.stderr
    chosen, rejected, margin = (evals(run, k) for k in ("reward_chosen", "reward_rejected", "reward_margin"))
    assert margin[0] == 0 and chosen[0] == rejected[0] == 0
    assert chosen[6] > 0 > rejected[6] and margin[6] > 0.5, (chosen, rejected)
    assert any("kl" in r for r in metrics(run)) and any("eval_kl" in r for r in metrics(run))
    report = eval_report(run, "eval.models=[adapter]")["adapter"]  # the held-out answers, desirable or not
    assert report["reward_margin"] > 0.5 and report["reward_accuracy"] > 0.5, report


@pytest.mark.slow
def test_smollm2_reward_model_ranks_held_out_pairs_and_merges_with_its_head(tmp_path, smollm2):
    run = tmp_path / "rm"
    p = qtune_warm(*smol("rm", run, "train.max_steps=6", "train.save_steps=6", "train.eval_steps=3",
                         "train.lr=1e-3"))
    assert p.returncode == 0, p.stdout + p.stderr
    acc, margin = evals(run, "reward_accuracy"), evals(run, "reward_margin")
    assert acc[6] > 0.5 and acc[6] > acc[0] and margin[6] > margin[0], (acc, margin)  # step 0: the untrained head
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]

    m = qtune_warm("merge", f"run={run}", "merge.dtype=fp32")
    assert m.returncode == 0, m.stdout + m.stderr
    merged = json.loads((run / "merged" / "config.json").read_text())
    assert merged["architectures"] == ["LlamaForSequenceClassification"] and len(merged["id2label"]) == 1
    report = eval_report(run)  # a reward model's default: its adapter and its merged model, never the bare base
    assert set(report) == {"adapter", "merged"}
    assert report["adapter"]["reward_accuracy"] == report["merged"]["reward_accuracy"] == acc[6]
    assert abs(report["merged"]["reward_margin"] - report["adapter"]["reward_margin"]) < 1e-3
    assert "is a reward model (train.stage=rm): it scores answers and writes none" in only_line(
        qtune_warm("chat", f"run={run}", "--prompt", "hi"))


@pytest.mark.slow
def test_smollm2_pt_trains_every_token_of_raw_text(tmp_path, smollm2):
    run = tmp_path / "pt"
    p = qtune_warm("train", "model=smollm2_135m", "train.stage=pt", f"data.path={REPO}/data/demo/logbook.jsonl",
              "data.val_size=0", "data.max_length=256", *FAST, "train.max_steps=4", "train.save_steps=4",
              "train.lr=1e-3", f"train.output_dir={run}")
    assert p.returncode == 0, p.stdout + p.stderr
    lo = losses(run)
    assert lo[4] < lo[1], lo
    from datasets import load_from_disk

    folder = next(w for w in p.stdout.split() if "/smollm2_135m-logbook/" in w).rstrip(")")
    rows = load_from_disk(f"{folder}/train")
    assert all(r["labels"] == r["input_ids"] for r in rows)  # no token masked: raw text, every token trained
    stats = json.loads(open(f"{folder}/stats.json").read())["train"]
    assert stats["trainable_tokens"] == stats["tokens"] > 0


# ---------------------------------------------------------------- the run folder: resume, chaining, sweeps


@pytest.mark.slow
def test_dpo_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path, tiny_qwen3):
    """As for sft (test_train): the same losses, reward figures and adapter within 1e-5 of a straight run. (Two
    held-out pairs are enough to compare the evals; all ten would take most of the test's time on the tiny model's
    152k-token vocabulary.)"""
    args = ["train.max_steps=8", "train.save_steps=4", "train.lr=5e-3", "data.max_eval_samples=2"]
    straight = tmp_path / "straight"
    assert qtune_warm(*tiny("dpo", straight, *args)).returncode == 0
    resumed = tmp_path / "resumed"
    kill_once(tiny("dpo", resumed, *args), resumed / "checkpoints" / "checkpoint-4" / "trainer_state.json")
    p = qtune_warm(*tiny("dpo", resumed, *args))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resuming from" in p.stdout and "(4 this time, resumed from step 4)" in p.stdout
    a, b = metrics(straight), metrics(resumed)
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]  # no row lost or repeated
    for ra, rb in zip(a, b):
        for key in ("loss", "reward_margin", "reward_accuracy", "eval_loss", "eval_reward_margin"):
            if key in ra:
                assert abs(ra[key] - rb[key]) < 1e-5, (ra["step"], key, ra[key], rb[key])
    ta, tb = adapter_tensors(straight / "adapter"), adapter_tensors(resumed / "adapter")
    assert ta.keys() == tb.keys() and all((ta[k] - tb[k]).abs().max() < 1e-5 for k in ta)


@pytest.mark.slow
def test_dpo_starts_from_an_sft_adapter_which_is_also_its_reference(tmp_path, tiny_run):
    """train.init_adapter: the SFT adapter's weights start the run (a step at lr 1e-12 leaves them in place), the run's
    config.yaml records where it started, and the reference is that adapter, not the base: the first eval's rewards
    are 0 although the SFT adapter's rewards against the base are not."""
    run = tmp_path / "dpo"
    p = qtune_warm(*tiny("dpo", run, f"train.init_adapter={tiny_run}", "train.max_steps=1", "train.save_steps=1",
                    "train.lr=1e-12", "data.max_eval_samples=2"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "train.init_adapter:" in p.stdout and "tensors loaded" in p.stdout
    import yaml

    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["init_adapter"] == str(tiny_run)
    assert json.loads((run / "summary.json").read_text())["init_adapter"] == str(tiny_run)
    sft, dpo = adapter_tensors(tiny_run / "adapter"), adapter_tensors(run / "adapter")
    assert sft.keys() == dpo.keys() and all((sft[k] - dpo[k]).abs().max() < 1e-6 for k in sft)
    assert not (run / "adapter" / "ref").exists()  # TRL's frozen reference copy stays out of the saved adapter
    assert evals(run, "reward_margin")[0] == 0
    against_base = eval_report(run, "eval.models=[base,adapter]")["adapter"]["reward_margin"]
    assert abs(against_base) > 1e-4


@pytest.mark.slow
def test_dpo_on_moe_experts_capped_on_the_fast_path(tmp_path, tiny_qwen3_moe):
    """moe.max_experts on the fast path (train.fast=true runs it on CPU too): TRL copies the adapter as its reference
    before qtune removes the copy, so dpo keeps full-size expert adapters, masked to the chosen experts."""
    run = tmp_path / "run"
    p = qtune_warm("train", "model=tiny_qwen3_moe", "train.stage=dpo", "train.fast=true", "moe.max_experts=2",
              "lora.dropout=0", *PAIRS, *FAST, "train.max_steps=2", "train.save_steps=2", "train.lr=5e-2",
              f"train.output_dir={run}")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "grouped-matmul experts" in p.stdout and "chosen experts only" not in p.stdout
    experts = {k: t for k, t in adapter_tensors(run / "adapter").items() if ".experts." in k and "lora_B" in k}
    assert experts and all(t.abs().sum() > 0 for t in experts.values())


@pytest.mark.slow
def test_dpo_sweep_summary_shows_the_reward_figures(tmp_path, tiny_qwen3):
    p = qtune_warm("train", "-m", "model=tiny_qwen3", "train.stage=dpo", *PAIRS, *FAST, "train.max_steps=2",
              "train.save_steps=2", "train.dpo.beta=0.1,0.5", "data.max_eval_samples=2", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    sweep = next((tmp_path / "runs").glob("sweep-*"))
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(r["overrides"] for r in rows) == ["train.dpo.beta=0.1", "train.dpo.beta=0.5"]
    assert all(r["reward_accuracy"] != "" and float(r["reward_margin"]) > 0 for r in rows), rows
    assert "| reward accuracy | reward margin |" in (sweep / "summary.md").read_text()


# ---------------------------------------------------------------- the dry run


def test_the_plan_counts_pairs_twice_and_a_reward_models_score_head():
    from qtune.config import compose, to_object
    from qtune.commands.train import plan

    def p(*o):
        return plan(to_object(compose(["model=qwen3_8b", "quant=nf4", *o])))

    sft, dpo, kto, rm = p(), p("train.stage=dpo"), p("train.stage=kto", "train.batch_size=2"), p("train.stage=rm")
    act = {k: v["memory"]["activation_bytes"] for k, v in (("sft", sft), ("dpo", dpo), ("kto", kto), ("rm", rm))}
    assert act["dpo"] == 2 * act["sft"]                 # chosen and rejected side by side
    assert act["kto"] == 2 * act["sft"]                 # batch 2: its KL and reference passes keep nothing
    # pairs, under a one-output head: the vocabulary head's phase (a tile of logits, the hidden states' gradients) is
    # below a layer's backward at 2048 tokens, so it adds nothing to the peak
    assert act["rm"] == 2 * act["sft"]
    assert rm["trainable_params"] == sft["trainable_params"] + 4096  # the score head (1 x hidden), trained whole
    assert dpo["trainable_params"] == sft["trainable_params"]


def test_reward_model_plan_equals_peft(tiny_qwen3):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from qtune.config import compose, to_object
    from qtune.modeling.targets import match, peft_config
    from qtune.modeling.targets import lora_settings
    from qtune.commands.train import plan

    cfg = to_object(compose(["model=tiny_qwen3", "train.stage=rm", "lora=all_linear"]))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_qwen3, num_labels=1, dtype=torch.float32)
    matched = match(model, lora_settings(cfg), cfg.moe)
    assert "score" not in matched.names("lora")  # all_linear leaves the head to be trained whole
    trainable, _ = get_peft_model(model, peft_config(matched, lora_settings(cfg), False, "SEQ_CLS")).get_nb_trainable_parameters()
    assert plan(cfg)["trainable_params"] == trainable


def test_a_quantized_models_adapters_are_estimated_as_trl_keeps_them(tiny_rm_run):
    """TRL casts a quantized model's trainable weights to bf16 (QLoRA's recipe) and AdamW keeps its moments in their
    dtype: the estimate's adapter bytes equal the real run's weights, gradients and optimizer moments (the score head
    stays in the model's dtype, fp32 on a CPU, as the estimate's on_gpu=False counts it)."""
    import torch

    from qtune.config import compose, to_object
    from qtune.modeling.estimate import estimate
    from qtune.modeling.plan import plan

    cfg = to_object(compose(["model=tiny_qwen3", "quant=nf4", "train.stage=rm"]))
    p = plan(cfg)
    m = estimate(p.model, cfg.model.arch, p.matched, cfg.quant, cfg.data.max_length, True, on_gpu=False)
    state = torch.load(sorted((tiny_rm_run / "checkpoints").glob("checkpoint-*"))[-1] / "optimizer.pt", weights_only=True)["state"]
    moments = [s[k] for s in state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert {t.dtype for t in moments} == {torch.bfloat16, torch.float32}  # the adapters, the score head
    # each weight and its gradient have its moments' dtype and size
    assert m.lora == 2 * sum(t.numel() * t.element_size() for t in moments)


def test_dry_run_names_the_stage():
    p = qtune_warm("train", "--dry-run", "model=qwen3_8b", "quant=nf4", "train.stage=dpo")
    assert p.returncode == 0, p.stderr
    out = " ".join(p.stdout.split())  # (Rich wraps the title at the terminal's width)
    assert "train.stage=dpo" in out and "× 2 (chosen and rejected)" in out


# ---------------------------------------------------------------- on the GPU (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("fast", ["true", "false"])
def test_gpu_dpo_in_nf4_trains_the_adapter(tmp_path, tiny_qwen3, fast):
    """DPO on a 4-bit base on CUDA, with gradient checkpointing (TRL switches it off for each reference forward and
    back on with qtune's kind: reentrant on the fast path, non-reentrant on the reference path)."""
    run = tmp_path / "run"
    p = qtune("train", "model=tiny_qwen3", "quant=nf4", "train.device=cuda", "train.stage=dpo", f"train.fast={fast}",
              *PAIRS, "train.grad_accum=1", "train.logging_steps=1", "train.warmup_ratio=0", "train.report_to=[]",
              "train.batch_size=2", "train.max_steps=4", "train.save_steps=4", "train.lr=5e-3",
              f"train.output_dir={run}")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward_margin"]) for r in rows), rows
    b = [t for k, t in adapter_tensors(run / "adapter").items() if "lora_B" in k]
    assert b and all(t.float().abs().sum() > 0 for t in b)  # lora_B starts at zero: every one moved
    assert json.loads((run / "summary.json").read_text())["train_peak_memory_bytes"] > 0
