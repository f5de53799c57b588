"""Hydra glue: one place composes the config for every verb and for the tests.

Single runs use Hydra's compose API. Multirun goes through Hydra's own sweeper and launcher
(`hydra._internal.utils._run_hydra`, an internal API: hydra-core is pinned to 1.3.x and
tests/test_config.py covers the route), so `a=1,2`, `range()`, `hydra/launcher=joblib` work as
Hydra users expect. Composition errors, which Hydra prints over several lines, become one
`ConfigError` line that names the key and what would be valid.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from qtune.config import schema
from qtune.errors import ConfigError, exception_chain


def _find_dir(in_wheel: str, in_checkout: str, probe: str) -> Path:
    packaged = Path(__file__).resolve().parents[1] / in_wheel  # inside an installed wheel (pyproject's force-include)
    if (packaged / probe).is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / in_checkout   # a source checkout


CONF_DIR = _find_dir("conf", "conf", "config.yaml")
DEMO_DATA_DIR = _find_dir("demo_data", "data/demo", "captains_log.jsonl")  # data=demo and eval=demo, from any folder
GROUPS = ("model", "download", "quant", "lora", "moe", "data", "train", "chat", "serve", "merge", "eval", "hub")


def _repo(variant: str, instruct: str | None, base: str | None) -> str:
    repo = base if str(variant) == "base" else instruct
    if repo in (None, "None", ""):
        raise ValueError(f"this model has no {variant} release; choose model.variant=instruct or set model.repo_id")
    return repo


def data_name(path, sources) -> str:
    """The data's part of run_name: "mix" for data.sources, "demo" for qtune's demo data, else the name of data.path
    (a file's stem, a folder's or a glob's folder's name, a hub dataset's name), in letters, digits, `.`, `_`, `-`."""
    if sources:
        return "mix"
    if path in (None, "", "None"):
        return "nodata"
    path = str(path)
    if path.startswith("hf://") or (not Path(path).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
        name = path.rstrip("/").rpartition("/")[2]  # a hub dataset: org/name
    else:
        p = Path(path).expanduser()
        if p.resolve().parent == DEMO_DATA_DIR.resolve():
            return "demo"
        while any(c in p.name for c in "*?[") and p.parent != p:
            p = p.parent  # a glob: the folder it matches in
        name = p.stem if p.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".parquet") else p.name
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "data"


def _register() -> None:
    if not OmegaConf.has_resolver("qtune.repo"):
        OmegaConf.register_new_resolver("qtune.repo", _repo)
    if not OmegaConf.has_resolver("qtune.data_name"):
        OmegaConf.register_new_resolver("qtune.data_name", data_name)
    if not OmegaConf.has_resolver("qtune.method_tag"):  # run_name's last part: r16 (LoRA's rank), full, freeze
        OmegaConf.register_new_resolver("qtune.method_tag", lambda method, r: f"r{r}" if str(method) == "lora" else str(method))
    if not OmegaConf.has_resolver("qtune.demo_data"):
        OmegaConf.register_new_resolver("qtune.demo_data", lambda name: str(DEMO_DATA_DIR / name))
    schema.store()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides; resolve and validate it completely."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _register()
    overrides = [_quote_names(o) for o in overrides]
    _check_group_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qtune"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)
    except Exception as e:  # Hydra wraps OmegaConf's errors; reduce them to one line
        raise ConfigError(_one_line(e, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    check(cfg)
    return cfg


def _quote_names(override: str) -> str:
    """data.dataset=a,b (LLaMA-Factory's way to name several datasets) as one value, not a sweep Hydra refuses."""
    key, sep, value = override.partition("=")
    if sep and key.lstrip("+") == "data.dataset" and "," in value and value[:1] not in "'\"[":
        return f"{key}='{value}'"
    return override


def check(cfg: DictConfig) -> None:
    """Resolve every interpolation and build the typed objects, so mistakes surface now."""
    _check_unknown_keys(cfg)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(_one_line(e, [])) from None
    _check_package_repo(cfg)


def _check_package_repo(cfg: DictConfig) -> None:
    """An embedded model (model.source=package) comes from the file its package ships, never from model.repo_id: another
    repo_id would be ignored silently, so it is refused with what trains another repo."""
    model = cfg.model
    option = CONF_DIR / "model" / f"{model.name}.yaml"
    if str(model.source) != "package" or not option.is_file():
        return
    own = OmegaConf.load(option).get("repo_id")
    if own is None or model.repo_id == own:
        return
    hub = [o for o in group_options("model") if OmegaConf.load(CONF_DIR / "model" / f"{o}.yaml").get("source") == "hub"]
    raise ConfigError(f"model.repo_id={model.repo_id}: model={model.name} is the embedded {own}, read from the file "
                      f"the {model.package} package ships, so model.repo_id is not used; to train another Hugging Face "
                      f"repo choose the model option of its architecture and size and name the repo, e.g. "
                      f"model=qwen3_8b model.repo_id={model.repo_id} (options: {', '.join(hub)})")


def to_object(cfg: DictConfig) -> schema.Config:
    """Typed objects for run(): convert at the boundary."""
    node = cfg.copy()
    with_hydra = "hydra" in node
    if with_hydra:
        from omegaconf import open_dict

        with open_dict(node):
            del node["hydra"]
    try:
        return OmegaConf.to_object(node)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(_one_line(e, [])) from None


def multirun(overrides: Sequence[str], task: Callable[[DictConfig], object], sweep_dir: str | None = None) -> None:
    """Run `task` once per job of a Hydra sweep, through Hydra's sweeper and launcher."""
    from hydra._internal.utils import _run_hydra, get_args_parser

    _register()
    overrides = list(overrides)
    check_sweep(overrides)
    hydra_overrides = [
        "hydra.sweep.dir=" + (sweep_dir or "runs/sweep-${now:%Y%m%d-%H%M%S}"),
        "hydra.sweep.subdir=${hydra.job.num}",
        "hydra.job.chdir=false",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    parser = get_args_parser()
    args = parser.parse_args([*hydra_overrides, *overrides, "--multirun"])
    _run_hydra(args=args, args_parser=parser, task_function=task, config_path=str(CONF_DIR),
               config_name="config")


# hydra/launcher options and the package each needs; without it Hydra would only say that a config is missing
LAUNCHER_PACKAGES = {"joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
                     **{name: ("hydra_plugins.hydra_submitit_launcher", "qtune[slurm]")
                        for name in ("slurm", "submitit_slurm", "submitit_local")}}


def check_sweep(overrides: Sequence[str]) -> DictConfig:
    """Fail fast, in one line, before Hydra launches anything: every group option and plain override, and the key and
    type of every swept value (`train.lr=1e-4,abc`, `lora.rr=8,16`). What depends on a job's whole config
    (`train.lr=1e-4,-1`: a value out of range) is that job's error, a row of the summary (qtune.commands.sweep).
    Returns the config of the plain overrides: what every job shares unless the sweep varies it."""
    import importlib.util

    _check_group_choices(overrides)
    for o in overrides:
        module, package = LAUNCHER_PACKAGES.get(o.removeprefix("hydra/launcher="), (None, None))
        if o.startswith("hydra/launcher=") and module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{o} needs a launcher plugin that is not installed: pip install '{package}'")
    swept = _sweeps(overrides)
    plain = [o for o in overrides if o not in swept]
    base = compose(plain)
    for o, (key, values) in swept.items():
        for value in values:  # each value once, over the plain overrides, as Hydra applies it: its key and type
            _check_value(base, f"{key}={value}")
    return base


def swept_keys(overrides: Sequence[str]) -> set[str]:
    """The keys a sweep varies (`lora`, `train.lr`), without +/~/++ prefixes."""
    return {key.lstrip("+~") for key, _ in _sweeps(overrides).values()}


def _check_value(base: DictConfig, override: str) -> None:
    """One key=value override applied to a copy of `base` the way Hydra's config loader applies it (milliseconds,
    where composing again takes a quarter of a second)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = base.copy()
    try:
        ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides([override]), cfg)
    except Exception as e:
        raise ConfigError(_one_line(e, [override])) from None
    _check_unknown_keys(cfg)


def _sweeps(overrides: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """The sweep overrides (a=1,2, range(), choice(), glob()) by override: (key, each value as an override writes it);
    Hydra's own parser reads them, as its sweeper will. Group options (checked apart) and hydra.* keys are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = {}
    for o in overrides:
        try:
            parsed = parser.parse_overrides([o])[0]
        except Exception as e:
            raise ConfigError(_one_line(e, [o])) from None
        key = parsed.get_key_element()
        if parsed.is_sweep_override() and not key.lstrip("+~").startswith("hydra") and key not in GROUPS:
            out[o] = (key, list(parsed.sweep_string_iterator()))
        elif parsed.is_sweep_override():
            out[o] = (key, [])
    return out


def _check_group_choices(overrides: Sequence[str]) -> None:
    for o in overrides:
        m = re.fullmatch(r"([a-z_]+)=([\w,]+)", o)
        if m and m.group(1) in GROUPS:
            group, choices = m.groups()
            options = group_options(group)
            for choice in choices.split(","):  # a sweep over options is checked option by option
                if choice not in options:
                    raise ConfigError(f"{group}={choice}: no such option; valid: {', '.join(options)}")


def _one_line(e: Exception, overrides: Sequence[str]) -> str:
    chain = exception_chain(e)
    keyed = next((c for c in chain if getattr(c, "full_key", None)), None)
    text = str(keyed or e)
    key = str(keyed.full_key) if keyed else None

    if any(type(c).__name__ == "OverrideParseException" for c in chain):
        bad = next((o for o in overrides if o in str(e)), None) or _unparsable(overrides)
        return (f"cannot parse override {bad!r}: write key=value, +key=value or ~key, and quote values with "
                "special characters, e.g. 'data.path=\"~/x.jsonl\"'")
    m = re.search(r"Could not find '([^']+)/([^']+)'", str(e))
    if m:
        group, choice = m.groups()
        return f"{group}={choice}: no such option; valid: {', '.join(group_options(group))}"
    if key is None:
        return " ".join(str(e).split("\n")[0].split())
    if re.search(r"Key '[^']+' (not in|is not in struct)", text):
        named = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        return _unknown_key(key, next((n for n in named if n.startswith(key + ".")), None))
    m = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", text)
    if m:
        return f"{key}={m.group(1)}: invalid choice; valid: {m.group(2)}"
    m = re.search(r"Value '([^']*)' of type '\w+' could not be converted to (\w+)", text)
    if m:
        kind = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}.get(m.group(2), m.group(2))
        return f"{key}={m.group(1)}: expected {kind}"
    m = re.search(r"Cannot merge (Dict|List)Config with (Dict|List)Config[\s\S]*reference_type=(Dict|List)", text)
    if m:  # OmegaConf words it the same either way; the key's declared type says which was wanted
        return {"Dict": f"{key}: expected a mapping like {{name: value}}, got a list",
                "List": f"{key}: expected a list like [a, b], got a mapping"}[m.group(3)]
    if "Missing mandatory value" in text:
        return f"{key}: missing value; set it with {key}=..."
    first = re.sub(r"^\w+ raised while resolving interpolation: ", "", text.splitlines()[0])
    return f"{key}: {first}"


def _unparsable(overrides: Sequence[str]) -> str:
    """The first override Hydra's grammar rejects (its error quotes only the offending token)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except Exception:
            return o
    return "?"


def _check_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Hydra's `+key=` appends even onto typed nodes; reject keys the schema does not know."""
    import dataclasses

    typ = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(typ):
        return
    known = {f.name for f in dataclasses.fields(typ)}
    for k in node.keys():
        full = f"{prefix}{k}"
        if k not in known:
            raise ConfigError(_unknown_key(full))
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_unknown_keys(child, full + ".")


# What transformers' TrainingArguments, PEFT, LLaMA-Factory and axolotl call some of qtune's settings; an unknown key
# with one of these names (in any group) points to qtune's.
ALIASES = {
    "learning_rate": "train.lr", "lr_scheduler_type": "train.scheduler", "lr_scheduler": "train.scheduler",
    "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "output_dir": "train.output_dir", "max_steps": "train.max_steps", "warmup_ratio": "train.warmup_ratio",
    "optimizer": "train.optim", "resume_from_checkpoint": "train.resume", "bf16": "train.dtype=bf16",
    "fp16": "train.dtype=fp16", "nproc_per_node": "train.nproc", "num_gpus": "train.nproc",
    "deepspeed": "train.distributed", "fsdp": "train.distributed=fsdp", "pref_beta": "train.dpo.beta",
    "dpo_beta": "train.dpo.beta", "pref_loss": "train.dpo.loss_type",
    "lora_rank": "lora.r", "lora_r": "lora.r", "rank": "lora.r", "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout", "lora_target": "lora.target_modules", "lora_target_modules": "lora.target_modules",
    "cutoff_len": "data.max_length", "max_seq_length": "data.max_length", "max_seq_len": "data.max_length",
    "sequence_len": "data.max_length", "model_max_length": "data.max_length", "dataset": "data.dataset",
    "datasets": "data.sources", "dataset_dir": "data.path", "eval_dataset": "data.eval_path",
    "val_set_size": "data.val_size", "preprocessing_num_workers": "data.num_proc", "template": "model.chat_template",
    "model_name_or_path": "model.repo_id", "base_model": "model.repo_id",
    "quantization_bit": "quant=nf4", "load_in_4bit": "quant=nf4", "load_in_8bit": "quant=int8",
}


def _all_keys(node=None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (groups included), e.g. train, train.lr, train.dpo.beta."""
    node = schema.Config() if node is None else node
    keys = []
    for name, value in vars(node).items():
        keys.append(prefix + name)
        if hasattr(value, "__dataclass_fields__"):
            keys += _all_keys(value, f"{prefix}{name}.")
    return keys


def suggest(key: str) -> str | None:
    """The setting a mistyped or foreign `key` most likely means: another tool's name for it (ALIASES), the same name
    in another group, else the closest dotted key by edit distance (difflib), its own group's first."""
    parent, _, leaf = key.rpartition(".")
    name = leaf.lower().replace("-", "_")
    if name in ALIASES:
        return _alias(name)
    keys = [k for k in _all_keys() if k != key]
    same_leaf = [k for k in keys if k.rpartition(".")[2] == name and "." in k]
    if same_leaf:
        return " or ".join(same_leaf[:3])
    ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()  # noqa: E731
    # (score, cut-off, suggestion): its own group's keys from 0.6 (difflib's default), any other key from 0.8
    scored = []
    for k in keys:
        k_parent, _, k_leaf = k.rpartition(".")
        if k_parent == parent:
            scored.append((ratio(name, k_leaf), 0.6, k))
        scored.append((max(ratio(key, k), ratio(name, k_leaf)), 0.8, k))
    part_of = [k for k in keys if k.rpartition(".")[0] == parent and len(name) >= 3 and _part(name, k.rpartition(".")[2])]
    if part_of:  # temp: temperature; weight: desirable_weight, undesirable_weight
        scored.append((0.9, 0.8, " or ".join(part_of[:3])))
    for alias, target in ALIASES.items():
        scored.append((ratio(name, alias), 0.8, _alias(alias)))
    best = max(((score, s) for score, cut, s in scored if score >= cut), default=None)
    return best[1] if best else None


def _alias(name: str) -> str:
    target = ALIASES[name]
    return target if re.split(r"[.=]", target)[-1] == name else f"{target} (qtune's name for {name})"


def _part(name: str, leaf: str) -> bool:
    """`name` begins `leaf` or is one of its words (temp: temperature, weight: desirable_weight)."""
    return leaf.startswith(name) or name in leaf.split("_")


def _unknown_key(key: str, full: str | None = None) -> str:
    """`key` is unknown; `full`: the whole dotted key of the override that named it (`trian.lr` when `trian` is the
    unknown part), which the suggestion is made for."""
    parent = key.rpartition(".")[0]
    close = suggest(full or key)
    hint = f"; did you mean {close}?" if close else ""
    where = f"'{parent}'" if parent else "the top level"
    return f"{key}: unknown key in {where}{hint}"


# ---------------------------------------------------------------- experiment files: `qtune train exp.yaml [overrides]`

EXPERIMENT_SUFFIXES = (".yaml", ".yml")


def expand_experiment(overrides: Sequence[str]) -> list[str]:
    """An experiment file among the arguments (`qtune train exp.yaml lora=r64`, one YAML per experiment as in
    LLaMA-Factory and axolotl) becomes the overrides it stands for, placed before the other arguments (which win):
    its `defaults:` list (`- model: qwen3_8b`) gives group options, every other key a value over qtune's defaults. What
    `qtune <verb> --cfg` prints is such a file: values that qtune derives from others (run_name, train.output_dir,
    model.local_dir...) and that the file holds as derived are left to be derived again, so `lora=r64` on the command
    line still names its own run folder. A key qtune does not know is one line naming the file and the key."""
    files = [o for o in overrides if "=" not in o and o.lower().endswith(EXPERIMENT_SUFFIXES)]
    if not files:
        return list(overrides)
    if len(files) > 1:
        raise ConfigError(f"{files[1]}: one experiment file at a time (already given: {files[0]})")
    path = Path(files[0]).expanduser()
    rest = [o for o in overrides if o != files[0]]
    data = _load_experiment(path)
    groups = _experiment_groups(path, data.pop("defaults", None) or [])
    data.pop("hydra", None)
    leaves: list[tuple[str, object]] = []
    _flatten(path, data, schema.Config, "", leaves)
    try:
        raw = compose(groups)
        base = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
        changed = [(k, v) for k, v in leaves if _get(base, k, _MISSING) != v]
        derived = [(k, v) for k, v in changed if _is_interpolation(raw, k)]
        kept = [(k, v) for k, v in changed if (k, v) not in derived]
        if derived:  # what the file's own settings derive again is left to be derived (from the overrides too)
            again = OmegaConf.to_container(compose(groups + [f"{k}={_literal(v)}" for k, v in kept]), resolve=True,
                                           enum_to_str=True)
            kept += [(k, v) for k, v in derived if _get(again, k, _MISSING) != v]
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    named = {o.split("=", 1)[0] for o in rest if "=" in o}  # `lora=r64` after the file: that group's values are
    kept = [(k, v) for k, v in kept if k.split(".", 1)[0] not in named or k.split(".", 1)[0] not in GROUPS]
    return groups + [f"{k}={_literal(v)}" for k, v in kept] + rest  # (the option's, not the file's)


_MISSING = object()


def _load_experiment(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file (an argument ending in .yaml is read as one)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({e.problem or e})") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read it as YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (key: value), got a {type(data).__name__}")
    return data


def _experiment_groups(path: Path, defaults) -> list[str]:
    """`defaults: [{model: qwen3_8b}, {lora: r64}]` (or `override model: ...`, as in Hydra's own files) -> group=option."""
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: defaults: expected a list like [{{model: qwen3_8b}}, {{lora: r64}}]")
    out = []
    for entry in defaults:
        if entry in ("_self_", "qtune_schema"):
            continue
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise ConfigError(f"{path}: defaults: {entry!r}: write each entry as `- group: option`, e.g. `- model: qwen3_8b`")
        (group, option), = entry.items()
        group = str(group).removeprefix("override ").strip()
        if group not in GROUPS:
            raise ConfigError(f"{path}: defaults: {group}: no such group; valid: {', '.join(GROUPS)}")
        if str(option) not in group_options(group):
            raise ConfigError(f"{path}: defaults: {group}: {option}: no such option; valid: {', '.join(group_options(group))}")
        out.append(f"{group}={option}")
    return out


def _flatten(path: Path, data: dict, typ, prefix: str, out: list) -> None:
    """The file's values as (dotted key, value), down to the schema's leaves (a list or a free mapping stays whole)."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(typ)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{path}: {_unknown_key(full)}")
        sub = fields[key].type
        sub = getattr(schema, sub, None) if isinstance(sub, str) else sub
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {full}: expected a mapping of its settings, got {value!r}")
            _flatten(path, value, sub, full + ".", out)
        else:
            out.append((full, value))


def _get(container, key: str, default):
    node = container
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _is_interpolation(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node and OmegaConf.is_interpolation(node, leaf)


def _literal(value) -> str:
    """A value in Hydra's override grammar: null, true, numbers, 'quoted strings', [lists], {mappings}."""
    import math

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in value.items()) + "}"
    text = str(value).replace("'", "\\'")
    trailing = len(text) - len(text.rstrip("\\"))
    return "'" + text + "\\" * trailing + "'"
