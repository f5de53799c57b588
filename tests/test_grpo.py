"""train.stage=grpo: the built-in rewards on answers they must accept and refuse, prompt records as the trainer gets
them, the dry run's micro-batch of completions, and the real CLI on the tiny Qwen3: a few steps of TRL's GRPOTrainer
with its own generation, the rewards in metrics.jsonl, samples.jsonl and summary.json, a reward that scores every
completion alike giving no advantage, `qtune eval`'s held-out rewards, and a reward function that raises stopping the
run in one line; and the embedded SmolLM2's reward rising within a few steps."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, one_line_error, qtune_warm

ADDITION = f"data.path={REPO}/data/demo/addition.jsonl"
FAST = ["train.grad_accum=1", "train.logging_steps=1", "train.warmup_ratio=0", "train.report_to=[]",
        "train.gradient_checkpointing=false", "data.val_size=0"]


def grpo(out, *extra: str) -> list[str]:
    return ["train", "model=tiny_qwen3", "train.stage=grpo", ADDITION, *FAST, "train.batch_size=2",
            "train.grpo.num_generations=2", "train.grpo.max_completion_length=6", f"train.output_dir={out}", *extra]


# ---------------------------------------------------------------- the built-in rewards


def _done(*texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_exact_answer_reads_boxed_hashes_and_the_last_number():
    from qtune.stages.rewards import exact_answer

    completions = _done("so it is \\boxed{1,000}", "#### 42", "3 + 4 makes 7.", "I think 8 then 9",
                        "\\boxed{\\frac{1}{2}}", "no number", "$1,000.")
    answers = ["1000", "The sum is 40 + 2\n#### 42", "7", "8", "\\frac{1}{2}", "3", "1e3"]
    assert exact_answer(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="no 'answer' field"):
        exact_answer(None, completions)


def test_format_wants_thinking_then_an_answer_and_length_penalises_the_last_quarter():
    from qtune.stages.rewards import length_penalty, think_format

    assert think_format(None, _done("<think>a + b</think> 5", "<think>a</think>", "5", " <think>\nx\n</think>\n\n5")) \
        == [1.0, 0.0, 0.0, 1.0]
    length = length_penalty(16)  # buffer 4: no penalty to 12 tokens, -1 at 16
    assert length(None, None, [[0] * 12, [0] * 13, [0] * 14, [0] * 16]) == [0.0, -0.25, -0.5, -1.0]


def test_a_reward_is_checked_and_named_as_trl_logs_it():
    from qtune.stages.rewards import RewardError, checked

    prompts = [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]]

    def fails_on_second(prompts, completions, **kw):
        return [1.0 if p[0]["content"] == "first" else 1 / 0 for p in prompts]

    f = checked(fails_on_second, "mod:fails_on_second")
    assert f.__name__ == "fails_on_second"
    with pytest.raises(RewardError, match=r"mod:fails_on_second raised ZeroDivisionError.*prompt 'second'"):
        f(prompts, _done("a", "b"))
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        checked(lambda **kw: [1.0], "one")(prompts, _done("a", "b"))
    with pytest.raises(RewardError, match="returned str 'x' for the prompt 'second'"):
        checked(lambda **kw: [1.0, "x"], "text")(prompts, _done("a", "b"))
    assert checked(lambda **kw: [1, None], "ok")(prompts, _done("a", "b")) == [1, None]


# ---------------------------------------------------------------- prompt records


def test_prompts_stay_messages_beside_their_fields(tmp_path, qwen3_tokenizer):
    from qtune.config import compose, to_object
    from qtune.data.prepare import prepare
    from qtune.stages import get

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"question": "Two and two?", "answer": "#### 4"}) + "\n"
                 + json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "1 + 1?"}], "answer": "2"}) + "\n"
                 + json.dumps({"prompt": "long " * 200, "answer": "0"}) + "\n")
    cfg = to_object(compose(["model=tiny_qwen3", "train.stage=grpo", f"data.path={f}", "data.val_size=0",
                             "data.max_length=64", f"data.cache_dir={tmp_path / 'cache'}"]))
    p = prepare(cfg.data, qwen3_tokenizer, "tiny_qwen3", None, get("grpo").data)
    rows = sorted(p.load("train").to_list(), key=lambda r: r["answer"])
    assert sorted(rows[0]) == ["answer", "prompt"]
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": "Two and two?"}],
                                           [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "1 + 1?"}]]
    assert [r["answer"] for r in rows] == ["#### 4", "2"]
    assert p.stats["train"]["dropped_no_trainable"] == 1  # the prompt over data.max_length is left out


def test_the_dry_run_counts_each_prompts_completions():
    from qtune.commands.train import plan
    from qtune.config import compose, to_object

    def act(*o):
        return plan(to_object(compose(["model=qwen3_8b", "quant=nf4", "train.offload_activations=false", *o])))[
            "memory"]["activation_bytes"]

    def grpo_act(n):
        return act("train.stage=grpo", f"train.grpo.num_generations={n}", "data.max_length=1024",
                   "train.grpo.max_completion_length=1024")

    # n completions of a prompt of up to 1024 tokens and 1024 generated: the tokens of an sft row of n x 2048
    assert grpo_act(2) == act("data.max_length=4096") and grpo_act(4) == act("data.max_length=8192")
    p = qtune_warm("train", "--dry-run", "model=qwen3_8b", "train.stage=grpo")
    assert p.returncode == 0 and "each with train.grpo.num_generations completions" in p.stdout, p.stdout + p.stderr
    assert "rollouts' KV cache (kept while training" in p.stdout


def test_the_dry_run_counts_the_rollouts_cache_kept_or_freed():
    """Qwen3-8B, 8 prompts x 8 completions a round of up to 128 + 512 tokens: 64 x 640 tokens of 36 layers' keys and
    values (8 heads of 128, bf16) = 5.6 GiB; kept, it adds to training's peak, freed, the peak is the larger phase."""
    from qtune.commands.train import plan
    from qtune.config import compose, to_object

    def memory(*o):
        return plan(to_object(compose(["model=qwen3_8b", "quant=nf4", "train.stage=grpo", "train.batch_size=1",
                                       "train.grad_accum=8", "train.grpo.num_generations=8", "data.max_length=128",
                                       "train.grpo.max_completion_length=512", *o])))["memory"]

    kept, freed, theirs = memory(), memory("train.grpo.rollout_cache=free"), memory("train.grpo.generation=transformers")
    assert kept["generation_bytes"] == 2 * 36 * 8 * 128 * 64 * 640 * 2 and kept["generation_kept"]
    training = kept["activation_bytes"] + kept["dequantized_bytes"] + kept["delta_bytes"]
    assert kept["total_bytes"] - freed["total_bytes"] == min(training, kept["generation_bytes"])
    assert not freed["generation_kept"] and freed["total_bytes"] == theirs["total_bytes"]


def test_the_settings_reach_trls_config(tmp_path):
    import torch

    from qtune.config import compose, to_object
    from qtune.training.trainers import training_args

    cfg = to_object(compose(["model=tiny_qwen3", "train.stage=grpo", "train.batch_size=3", "train.grad_accum=2",
                             "train.grpo.num_generations=4", "train.grpo.enable_thinking=false", "train.grpo.beta=0.04",
                             "train.grpo.loss_type=dr_grpo", "train.grpo.importance_sampling_level=sequence",
                             "train.grpo.epsilon_high=0.28", "train.grpo.temperature=0.7",
                             "train.grpo.rewards=[{fn: exact_answer}, {fn: length, weight: 0.25}]"]))
    args = training_args(cfg, tmp_path, True, "cpu", torch.float32, False, evaluate_first=True)
    assert type(args).__name__ == "GRPOConfig"
    assert args.per_device_train_batch_size == 12 and args.generation_batch_size == 24  # 3 prompts x 4, 2 micro-steps
    assert args.chat_template_kwargs == {"enable_thinking": False} and args.reward_weights == [1.0, 0.25]
    assert (args.beta, args.loss_type, args.importance_sampling_level, args.epsilon_high, args.temperature) == (
        0.04, "dr_grpo", "sequence", 0.28, 0.7)
    assert args.metric_for_best_model == "eval_reward" and args.greater_is_better


# ---------------------------------------------------------------- the real CLI on the tiny Qwen3


def test_grpo_trains_logs_its_rewards_and_a_constant_reward_gives_no_advantage(tmp_path):
    """exact_answer (the random tiny model never adds up: 0) and a user's reward that gives every completion 1: the
    total is 0.5 x 1 for every completion, so no completion has an advantage over its group's others."""
    (tmp_path / "mine.py").write_text("def one(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    run = tmp_path / "run"
    p = qtune_warm(*grpo(run, "train.max_steps=2", "train.save_steps=2", "train.grpo.sample_every=1",
                    f"train.grpo.rewards=[{{fn: exact_answer}}, {{fn: '{tmp_path}/mine.py:one', weight: 0.5}}]"))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["reward"] == 0.5 and r["reward_one"] == 1.0 and r["reward_exact_answer"] == 0.0
        assert r["reward_zero_std"] == 1.0 and r["reward_std"] == 0.0
        assert r["completion_length"] <= 6 and "entropy" in r and "completion_clipped" in r
        assert r["rollout_tokens_per_s"] > 0
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    assert all(s["rewards"] == {"exact_answer": 0.0, "one": 1.0} and s["advantage"] == 0.0 for s in samples)
    assert samples[0]["prompt"][-1]["role"] == "user" and samples[0]["completion"][0]["role"] == "assistant"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage"] == "grpo" and summary["reward"] == 0.5 and summary["reward_one"] == 1.0
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "loss.png").is_file()
    # qtune eval: the run's rewards on a greedy completion of each held-out prompt, for the base and the adapter
    e = qtune_warm("eval", f"run={run}", "eval.models=[base,adapter]", f"eval.data={REPO}/data/demo/addition.jsonl",
                   "eval.max_eval_rows=2")
    assert e.returncode == 0, e.stdout + e.stderr
    models = json.loads((run / "eval" / "summary.json").read_text())["models"]
    for name in ("base", "adapter"):
        assert models[name]["reward"] == 0.5 and models[name]["pass@1"] == 0.0 and models[name]["reward_one"] == 1.0
    assert "held-out mean reward" in e.stdout


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_real_model_within_a_few_steps(tmp_path, smollm2):
    """The embedded SmolLM2-135M on the shipped addition prompts ("Reply with the number only"), rewarded when its
    reply starts with a number: about one completion in five does at first; GRPO's steps make it what the model does
    (seeded; 0.19 at the first step and 1.0 from the fourth when this was written)."""
    (tmp_path / "digit.py").write_text(
        "def digit(prompts, completions, **kwargs):\n"
        "    return [1.0 if c[0]['content'].lstrip()[:1].isdigit() else 0.0 for c in completions]\n")
    run = tmp_path / "run"
    p = qtune_warm("train", "model=smollm2_135m", "train.stage=grpo", ADDITION, *FAST, "train.batch_size=4",
                   "train.grpo.num_generations=4", "train.grpo.max_completion_length=4", "train.max_steps=6",
                   "train.lr=1e-3", f"train.grpo.rewards=[{{fn: '{tmp_path}/digit.py:digit'}}]",
                   f"train.output_dir={run}")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    reward = {r["step"]: r["reward"] for r in rows if "reward" in r}
    assert sorted(reward) == [1, 2, 3, 4, 5, 6]
    assert reward[1] <= 0.5, reward
    assert (reward[5] + reward[6]) / 2 >= reward[1] + 0.4, reward


def test_a_reward_function_that_raises_stops_the_run_in_one_line(tmp_path):
    (tmp_path / "bad.py").write_text("def boom(prompts, completions, answer, **kwargs):\n"
                                     "    return [int(a) / 0 for a in answer]\n")
    p = qtune_warm(*grpo(tmp_path / "run", "train.max_steps=1",
                         f"train.grpo.rewards=[{{fn: '{tmp_path}/bad.py:boom'}}]"))
    line = one_line_error(p)
    assert "bad.py:boom raised ZeroDivisionError: division by zero (first on the prompt 'What is" in line, line


# ---------------------------------------------------------------- qtune's rollouts through TRL's hook


def test_qtune_rollouts_feed_trls_step_as_its_own_generation_would(tmp_path, tiny_qwen3):
    """The batched engine's completions, handed over through TRL's rollout_func, give the same step inputs (prompt
    and completion tokens, masks, rewards, advantages) and the same loss as TRL's own path fed the same completions:
    generation differs, the loss must not."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from qtune.stages.grpo import Rollouts

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompts = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}]} for a, b in ((3, 4), (12, 30))]

    def varied(completions, **kwargs):  # some spread in a group, so the advantages are not all zero
        return [float(len(c[0]["content"]) % 5) for c in completions]

    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=10,
                report_to=[], use_cpu=True, bf16=False, logging_steps=1, beta=0.0, temperature=1.0)
    rollouts = Rollouts()
    ours = GRPOTrainer(model=model, reward_funcs=varied, args=GRPOConfig(**args), train_dataset=Dataset.from_list(
        prompts), processing_class=tok, rollout_func=rollouts)
    batch = [prompts[0], prompts[0], prompts[1], prompts[1]]
    model.train()
    torch.manual_seed(0)
    a = ours._generate_and_score_completions(batch)
    made = [row[m.bool()].tolist() for row, m in zip(a["completion_ids"], a["completion_mask"])]
    assert rollouts.engine is not None and rollouts.tokens == sum(len(c) for c in made) > 0

    class Replays(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kw):
            return made, None

    theirs = Replays(model=model, reward_funcs=varied, args=GRPOConfig(**args),
                     train_dataset=Dataset.from_list(prompts), processing_class=tok)
    b = theirs._generate_and_score_completions(batch)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages"):
        assert torch.equal(a[key], b[key]), key
    assert a["advantages"].abs().sum() > 0
    ours.current_gradient_accumulation_steps = theirs.current_gradient_accumulation_steps = 1  # (set in a train loop)
    loss_a, loss_b = ours.compute_loss(model, a), theirs.compute_loss(model, b)
    assert abs(float(loss_a) - float(loss_b)) <= 1e-3 * max(abs(float(loss_b)), 1e-6), (loss_a, loss_b)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny_qwen3", "tiny_qwen3_moe"])
def test_gpu_grpo_steps_on_qtunes_rollouts_dense_and_moe(tmp_path, model, request):
    """On a GPU, auto picks qtune's engine: two GRPO steps on an nf4 base with the fast path (fused LoRA, grouped
    experts), the completions made by the captured batched step."""
    from qtune.config import compose, to_object
    from qtune.stages.grpo import Rollouts, rollout

    assert isinstance(rollout(to_object(compose([f"model={model}", "train.stage=grpo", "quant=nf4"]))), Rollouts)
    assert rollout(to_object(compose([f"model={model}", "train.stage=grpo", "quant=int8"]))) is None
    request.getfixturevalue(model)
    run = tmp_path / "run"
    p = qtune_warm("train", f"model={model}", "train.stage=grpo", ADDITION, *FAST, "quant=nf4", "train.batch_size=2",
                   "train.grpo.num_generations=4", "train.grpo.max_completion_length=24", "train.max_steps=2",
                   "train.save_steps=2", f"train.output_dir={run}", "train.grpo.rewards=[{fn: length}]")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["rollout_tokens_per_s"] > 0 for r in steps)
    assert all(0 < r["completion_length"] <= 24 for r in steps)
    assert "batched decoding without a CUDA graph" not in p.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_reward_model_from_an_rm_run_scores_completions_as_its_training_pairs_were_scored(tiny_rm_run, tmp_path):
    """{fn: reward_model, run: <an rm run>}: each prompt + completion rendered and tokenized as the rm run's pairs
    were, scored at the last token by the run's base + score-head adapter; a folder that is not an rm run is one line."""
    import torch

    from qtune.config import compose, to_object
    from qtune.errors import ConfigError
    from qtune.inference.load import load_with_adapters
    from qtune.inference.scoring import Scorer
    from qtune.runs import run_config
    from qtune.stages import rewards

    rewards.use_scorer(Scorer)
    grpo = to_object(compose(["train.stage=grpo", f"train.grpo.rewards=[{{fn: reward_model, run: '{tiny_rm_run}'}}]"]
                             )).train.grpo
    (fn,), _ = rewards.load(grpo)
    prompts = [[{"role": "user", "content": "Name a colour."}]] * 2 + ["What is 2 + 2?"]
    completions = [[{"role": "assistant", "content": t}] for t in ("Blue.", "I would rather not say.", "4")]
    got = fn(prompts=prompts, completions=completions)
    assert len(got) == 3 and all(isinstance(g, float) for g in got) and got[0] != got[1]
    # the same score by hand: the chat template's rendering of the pair, the model's output at the last token
    rcfg = run_config(tiny_rm_run, to_object(compose([])))
    model = load_with_adapters(rcfg, {"a": tiny_rm_run / "adapter"}, "cpu", torch.float32)
    scorer = Scorer(tiny_rm_run)
    ids = scorer.ids(prompts[0], "Blue.")
    assert scorer.tokenizer.decode(ids).endswith("Blue.<|im_end|>")
    with torch.no_grad():
        want = float(model(input_ids=torch.tensor([ids])).logits.reshape(-1)[0])
    assert abs(got[0] - want) < 1e-4
    bad = to_object(compose(["train.stage=grpo", f"train.grpo.rewards=[{{fn: reward_model, run: '{tmp_path}'}}]"]))
    with pytest.raises(ConfigError, match=r"train.grpo.rewards\[0\].fn=reward_model: run=.* is not a trained run folder"):
        rewards.load(bad.train.grpo)


@pytest.mark.slow
def test_grpo_killed_and_resumed_continues_its_reward_curve(tmp_path):
    """kill -9 after the step-2 checkpoint, then the same command: the run resumes there, and its rewards (a reward
    that varies with the sampled tokens, so the draws must continue as they would have) equal an uninterrupted run's."""
    from test_train import kill_once

    (tmp_path / "low.py").write_text("def low(prompts, completions, completion_ids, **kwargs):\n"
                                     "    return [sum(t < 75000 for t in ids) / len(ids) for ids in completion_ids]\n")

    def args(run):
        return grpo(run, "train.max_steps=4", "train.save_steps=2", f"train.grpo.rewards=[{{fn: '{tmp_path}/low.py:low'}}]")

    def rewards(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["reward"] for r in rows if "reward" in r}

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert qtune_warm(*args(straight)).returncode == 0
    kill_once(args(resumed), resumed / "checkpoints" / "checkpoint-2" / "trainer_state.json")
    p = qtune_warm(*args(resumed))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed from step 2" in p.stdout, p.stdout
    a, b = rewards(straight), rewards(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and len(set(a.values())) > 1
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
