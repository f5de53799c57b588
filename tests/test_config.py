"""The config tree: every option of every group composes; mistakes fail at compose time in one line."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from qtune.config import compose, to_object
from qtune.config.compose import GROUPS, group_options, multirun
from qtune.config.schema import Config, MoeScope, QuantMethod
from qtune.errors import ConfigError

from conftest import qtune_warm


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group):
    options = group_options(group)
    assert options, f"conf/{group}/ is empty"
    for option in options:
        cfg = to_object(compose([f"{group}={option}"]))
        assert isinstance(cfg, Config)


def test_groups_offered():
    assert {"qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b", "qwen3_30b_a3b",
            "qwen3_235b_a22b", "smollm2_135m", "tiny_qwen3", "tiny_qwen3_moe"} <= set(group_options("model"))
    assert set(group_options("quant")) == {"nf4", "int8", "none"}
    assert {"r8", "r16", "r32", "r64", "rslora", "dora"} <= set(group_options("lora"))
    assert {"none", "expert_only", "router_only", "all"} == set(group_options("moe"))


def test_defaults_match_the_seed_recipe_names():
    cfg = to_object(compose([]))
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.data.max_length == 2048
    t = cfg.train
    assert (t.seed, t.batch_size, t.grad_accum, t.lr, t.epochs, t.max_steps) == (42, 1, 16, 2e-4, 3, -1)
    assert (t.warmup_ratio, t.scheduler, t.save_total_limit, t.gradient_checkpointing, t.optim) == (
        0.05, "cosine", 2, True, "adamw_torch_fused")
    assert (cfg.chat.max_new_tokens, cfg.chat.temperature, cfg.chat.top_p) == (512, 0.7, 0.9)
    assert (cfg.serve.host, cfg.serve.port, cfg.serve.api_key) == ("127.0.0.1", 8000, None)
    assert cfg.model.trust_remote_code is False


def test_qlora_8b_composition():
    cfg = to_object(compose(["model=qwen3_8b", "quant=nf4", "lora=r64"]))
    assert cfg.model.repo_id == "Qwen/Qwen3-8B"
    assert cfg.quant.method is QuantMethod.nf4 and cfg.quant.double_quant
    assert cfg.lora.r == 64 and cfg.lora.alpha == 128
    assert cfg.run_name == "qwen3_8b-nodata-nf4-r64"


@pytest.mark.parametrize("data,name", [
    (["data.path=/data/chats.jsonl"], "chats"), (["data=demo"], "demo"), (["data.path=/data/chats/*.jsonl"], "chats"),
    (["data.path=HuggingFaceH4/ultrachat_200k"], "ultrachat_200k"),
    (["data.sources=[{path: a.jsonl}, {path: b.jsonl}]"], "mix"),
])
def test_run_name_holds_the_datas_name_so_another_data_set_is_another_run(data, name):
    """A second data set on the same model and settings trains into a new folder instead of meeting the first run."""
    cfg = to_object(compose(["model=qwen3_8b", "quant=nf4", *data]))
    assert cfg.run_name == f"qwen3_8b-{name}-nf4-r16" and cfg.train.output_dir == f"runs/{cfg.run_name}"
    other = to_object(compose(["model=qwen3_8b", "quant=nf4", "data.path=/data/other.jsonl"]))
    assert other.train.output_dir != cfg.train.output_dir


def test_base_variant_and_moe_facts():
    assert to_object(compose(["model=qwen3_8b", "model.variant=base"])).model.repo_id == "Qwen/Qwen3-8B-Base"
    moe = to_object(compose(["model=qwen3_30b_a3b", "moe=all"]))
    assert moe.model.arch.num_experts == 128 and moe.model.arch.num_experts_per_tok == 8
    assert moe.moe.scope is MoeScope.all


@pytest.mark.parametrize("overrides, expected", [
    (["quant=nf5"], "quant=nf5: no such option; valid: int8, nf4, none"),
    (["lora.r=abc"], "lora.r=abc: expected an integer"),
    (["train.lr=fast"], "train.lr=fast: expected a number"),
    (["train.foo=1"], "train.foo: unknown key in 'train'"),
    (["+train.foo=1"], "train.foo: unknown key in 'train'"),
    (["trian.lr=1"], "trian: unknown key in the top level; did you mean train.lr?"),
    (["lora.rr=8"], "lora.rr: unknown key in 'lora'; did you mean lora.r?"),
    (["quant.method=nf5"], "quant.method=nf5: invalid choice; valid: nf4, fp4, int8, none"),
    (["lora.dropout=2"], "lora.dropout must be in [0, 1), got 2.0"),
    (["model=qwen3_32b", "model.variant=base"], "model.repo_id: this model has no base release"),
])
def test_mistakes_fail_at_compose_time_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert str(e.value).startswith(expected)
    assert "\n" not in str(e.value)


def test_cli_cfg_prints_resolved_yaml():
    p = qtune_warm("train", "--cfg", "model=qwen3_8b", "quant=nf4", "lora=r64", check=True)
    y = OmegaConf.create(p.stdout)
    assert y.model.repo_id == "Qwen/Qwen3-8B"
    assert y.quant.method == "nf4" and y.quant.double_quant is True
    assert y.lora.r == 64


@pytest.mark.parametrize("args, fragment", [
    (["train", "quant=nf5"], "quant=nf5: no such option"),
    (["train", "lora.r=abc"], "lora.r=abc: expected an integer"),
    (["prepare", "data.nope=1"], "data.nope: unknown key"),
    (["chat", "data.path=~/x"], "cannot parse override"),
])
def test_cli_errors_are_one_line_exit_2(args, fragment):
    p = qtune_warm(*args)
    assert p.returncode == 2, p.stderr
    assert fragment in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_multirun_goes_through_hydra_sweeper(tmp_path):
    seen = []
    multirun(["lora=r8,r16", "train.lr=1e-4,2e-4"], lambda cfg: seen.append((cfg.lora.r, cfg.train.lr)),
             sweep_dir=str(tmp_path / "sweep"))
    assert sorted(seen) == [(8, 1e-4), (8, 2e-4), (16, 1e-4), (16, 2e-4)]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1", "2", "3"]


def test_sweep_over_a_wrong_option_fails_in_one_line():
    p = qtune_warm("train", "-m", "lora=r16,r99")
    assert p.returncode == 2 and "lora=r99: no such option" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_launcher_without_its_plugin_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        pytest.skip("hydra-submitit-launcher is installed here")
    p = qtune_warm("train", "-m", "hydra/launcher=slurm", "lora=r8,r16", cwd=tmp_path)
    assert p.returncode == 2 and "hydra/launcher=slurm needs a launcher plugin that is not installed: " \
        "pip install 'qtune[slurm]'" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_the_slurm_launcher_extends_the_plugins_config():
    """conf/hydra/launcher/slurm.yaml: the plugin's typed submitit_slurm config with qtune's defaults (one task a job,
    train.nproc GPUs in it)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qtune.config.compose import CONF_DIR, _register

    _register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm", "train.nproc=4", "hydra.launcher.partition=gpu"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 4 and launcher.tasks_per_node == 1 and launcher.nodes == 1


def test_every_alias_names_a_real_setting():
    """compose.ALIASES (other tools' names for qtune's settings) point to keys the schema has, or options that compose."""
    from qtune.config.compose import ALIASES, _all_keys

    keys = set(_all_keys())
    for alias, target in ALIASES.items():
        key, _, value = target.partition("=")
        assert key in keys or key in GROUPS, (alias, target)
        if value:
            compose([target])
