"""The layout holds: every config composes and builds, configs mirror registries, no cycles."""

from __future__ import annotations

import inspect
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import REPO, SHARED
from helpers.imports import cycles, import_graph
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vision_tl.core.config import config_dir
from vision_tl.data import DATASETS, SOURCES, Preprocess, Source
from vision_tl.data.datamodule import DataSettings
from vision_tl.data.sources import build_source
from vision_tl.models import HEADS, build_model
from vision_tl.training.build import build_data, preprocess_overrides
from vision_tl.training.finetune import FINETUNE, build_finetune
from vision_tl.training.task import ClassificationTask

CONF = config_dir()
ENTRY_POINTS = {
    "train",
    "shard",
    "eval",
    "predict",
    "explain",
    "export",
    "report",
    "audit",
    "select",
    "serve",
    "discover",
    "suggest",
}
PACKAGE = REPO / "src" / "vision_tl"
LAYERS = ("core", "data", "models", "training", "inference", "sweeps")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=overrides, return_hydra_config=True)


# Every folder of conf/ that holds options, so a new group is tested without a new test.
GROUPS = sorted({str(p.parent.relative_to(CONF)) for p in CONF.rglob("*/*.yaml")})
GROUP_OPTIONS = [(group, name) for group in GROUPS for name in _options(group)]


def _tiny_shards(tmp_path: Path) -> Path:
    from conftest import make_image_folder

    from vision_tl.data.shards import ShardSettings, write_shards
    from vision_tl.training.build import build_data

    folder = make_image_folder(tmp_path / "images", per_class=2, size=16)
    data = build_data({"root": str(folder)})
    settings = ShardSettings(str(tmp_path / "shards"))
    write_shards(data.source, data.catalog, settings, "fingerprint")
    return tmp_path / "shards"


@pytest.mark.integration  # builds every full-size network
@pytest.mark.parametrize(("group", "name"), GROUP_OPTIONS, ids=lambda v: str(v))
def test_every_config_option_composes_and_builds(group: str, name: str, tmp_path: Path) -> None:
    """`<group>=<name>` composes with the rest of `train`, and what it configures builds."""
    manifest = tmp_path / "labels.csv"  # for data=manifest; the other sources ignore it
    manifest.write_text("path,label\n")
    data_keys = [f"data.root={tmp_path}", f"data.manifest={manifest}"]
    if (group, name) == ("data", "shards"):  # a real shard set of a few images
        data_keys.append(f"data.shards={_tiny_shards(tmp_path)}")
    cfg = _compose([f"{group}={name}", *data_keys, f"paths.output_dir={tmp_path}"])
    if group in ("data", "experiment"):
        data = OmegaConf.to_container(cfg.data, resolve=True)
        settings = DataSettings.from_config(data)  # every data.* value passes data/rules.py
        assert isinstance(build_source(data, settings.cache_root), Source)
    if group in ("model", "model/head", "finetune", "experiment"):
        spec = OmegaConf.to_container(cfg.model, resolve=True)
        finetune = OmegaConf.to_container(cfg.finetune, resolve=True)
        task = ClassificationTask({**spec, "pretrained": False}, ["a", "b"], finetune=finetune)
        assert task(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    if group in ("optimizer", "scheduler", "experiment"):
        params = [torch.nn.Parameter(torch.zeros(2))]
        optimizer = instantiate(cfg.optimizer)(params=params)
        if cfg.get("scheduler"):
            scheduled = instantiate(cfg.scheduler)(optimizer, total_steps=10, steps_per_epoch=5)
            assert "scheduler" in scheduled
    if group == "trainer":
        # On the CPU, trainer=gpu's 16-mixed becomes bf16-mixed, and Lightning says so.
        fp16 = cfg.trainer.precision == "16-mixed"
        with pytest.warns(UserWarning, match="not supported on CPU") if fp16 else nullcontext():
            trainer = instantiate(cfg.trainer, accelerator="cpu", devices=1, logger=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs
    if group in ("callbacks", "logger"):
        for node in (cfg.get(group) or {}).values():
            if node is not None:
                assert instantiate(node) is not None
    if group == "hparams_search":
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    if group.startswith("hydra"):
        assert cfg.hydra.launcher._target_ and cfg.hydra.run.dir


def test_config_groups_mirror_the_registries() -> None:
    """A fine-tune policy or head without its config file (or the reverse) is caught here."""
    finetune_files = {
        n: OmegaConf.load(CONF / "finetune" / f"{n}.yaml") for n in _options("finetune")
    }
    assert {n: c.mode for n, c in finetune_files.items()} == {n: n for n in FINETUNE.names()}
    head_files = {
        n: OmegaConf.load(CONF / "model" / "head" / f"{n}.yaml") for n in _options("model/head")
    }
    assert {n: c.name for n, c in head_files.items()} == {n: n for n in HEADS.names()}


@pytest.mark.parametrize("mode", FINETUNE.names())
def test_every_finetune_policy_sets_a_trainable_head(mode: str) -> None:
    """Each registered policy builds from its config file and leaves the head trainable."""
    spec = OmegaConf.to_container(OmegaConf.load(CONF / "finetune" / f"{mode}.yaml"))
    policy = build_finetune(spec)
    model = build_model({"backbone": {"name": "resnet18"}}, 2, pretrained=False)
    policy.setup(model)
    assert all(p.requires_grad for p in model.head_parameters())
    *earlier, final = policy.plan()
    assert final.finetune is None and final.subdir is None, "the last stage is the run itself"
    for stage in earlier:  # a linear_probe run fits the head first (LP-FT)
        assert build_finetune(stage.finetune).cache_bypass_reason() is None
        assert not any(p.requires_grad for p in model.backbone_parameters())
    if final.from_previous:
        policy.start_finetune(model)
    backbone_trains = False
    for epoch in range(6):  # the feature cache may be used only if it never trains
        policy.on_train_epoch_start(model, epoch)
        backbone_trains |= any(p.requires_grad for p in model.backbone_parameters())
    assert backbone_trains == (policy.cache_bypass_reason() is not None)


@pytest.mark.integration
@pytest.mark.parametrize("name", DATASETS.names())
def test_every_builtin_dataset_generates_a_trainable_folder(name: str, session_cache: Path) -> None:
    keys = {"builtin": name, "cache": str(session_cache)}
    data = build_data(keys)
    catalog = data.catalog
    assert len(catalog.class_names) >= 2 and catalog.samples["train"] and catalog.samples["val"]
    image_size = preprocess_overrides(keys, data.source)["image_size"]
    assert image_size == DATASETS.get(name).image_size


# The package's own sources (a test may register a toy one of its own).
SHIPPED_SOURCES = [n for n in SOURCES.names() if SOURCES.get(n).__module__.startswith("vision_tl.")]


@pytest.mark.parametrize("name", SHIPPED_SOURCES)
def test_every_source_keeps_the_protocol_and_has_its_config(name: str) -> None:
    """A registered source is a `Source` with every method of the seam, selected by
    `conf/data/<name>.yaml` (`data=<name>`), which composes with the rest of `train`."""
    cls = SOURCES.get(name)
    assert issubclass(cls, Source) and cls.name == name
    for method in ("from_config", "catalog", "open", "signature", "file", "describe", "name_of"):
        assert callable(getattr(cls, method)), f"{name}.{method}"
    assert not getattr(cls, "__abstractmethods__", None), f"{name} leaves methods abstract"
    cfg = _compose([f"data={name}"])
    assert cfg.data.source == name and "batch_size" in cfg.data


def test_top_level_holds_only_thin_entry_points() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == ENTRY_POINTS
    for name in ENTRY_POINTS:
        lines = (PACKAGE / f"{name}.py").read_text().splitlines()
        assert len(lines) <= 45, f"{name}.py should only compose config and call its worker"


def test_no_import_cycles_even_inside_functions() -> None:
    assert cycles(import_graph(PACKAGE)) == []


def test_packages_import_only_downwards() -> None:
    """core <- data <- models <- training <- inference <- sweeps <- entry points."""
    rank = {name: i for i, name in enumerate(LAYERS)}

    def layer(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in rank else "entry points"

    rank["entry points"] = len(LAYERS)
    upward = [
        f"{a} -> {b}"
        for a, targets in import_graph(PACKAGE).items()
        for b in targets
        if rank[layer(a)] < rank[layer(b)]
    ]
    assert upward == []


@pytest.mark.skipif(not (SHARED / "tools" / "import_cycles.py").is_file(), reason="no ../shared")
def test_the_workplace_cycle_tool_agrees() -> None:
    tool = SHARED / "tools" / "import_cycles.py"
    out = subprocess.run(
        [sys.executable, str(tool), str(PACKAGE)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1].startswith("cycles=0 "), out


@pytest.mark.integration
def test_models_and_preprocessing_import_without_the_training_stack() -> None:
    """Models and preprocessing need neither the training stack nor pandas; predict and
    serve (and the Hydra callback every command loads) need no Lightning, torchmetrics,
    matplotlib or scipy.stats: ~2.4 s of their start-up."""
    code = (
        "import sys, vision_tl.models, vision_tl.data.preprocess, vision_tl.core.io\n"
        "print(sorted(m for m in ('lightning', 'pandas', 'matplotlib') if m in sys.modules))\n"
        "import vision_tl.inference.predict, vision_tl.inference.serving.scorer\n"
        "import vision_tl.sweeps.jobs\n"
        "from vision_tl.core.logs import quiet_third_party\n"
        "quiet_third_party()\n"
        "heavy = ('lightning', 'torchmetrics', 'matplotlib', 'scipy.stats')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


def test_data_package_exports_objects_not_submodules() -> None:
    """`vision_tl.data` resolves its names lazily; a name shadowed by a submodule would not."""
    import vision_tl.data as data

    for name in data.__all__:
        assert not inspect.ismodule(getattr(data, name)), name


def test_background_is_a_data_option_that_reaches_the_preprocessing(tmp_path: Path) -> None:
    cfg = _compose([f"data.root={tmp_path}", "data.background=[0,0,0]"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    source = build_source(data, tmp_path)
    assert Preprocess().resolve(preprocess_overrides(data, source)).background == (0, 0, 0)


@pytest.mark.parametrize(
    ("data", "pretrained"),
    [([], False), (["data.root=/d"], True), (["data.manifest=/d/labels.csv"], True)],
    ids=["builtin", "folder", "manifest-without-root"],
)
def test_pretrained_weights_default_on_for_the_users_own_data(data, pretrained) -> None:
    """A manifest without data.root is the user's data too: never random weights by default."""
    for model in ("classifier", "ensemble"):
        assert _compose([f"model={model}", *data]).model.pretrained is pretrained
