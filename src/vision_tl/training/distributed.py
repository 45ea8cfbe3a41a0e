"""DDP under Hydra: every rank runs exactly this job, in this job's folder.

Lightning starts ranks 1..N-1 by re-running the command line. Under Hydra that command
may be a whole multirun (`-m`, or `hparams_search=` with `hydra.mode: MULTIRUN`), and
a fresh `${now:...}` run dir: ranks would start sweeps of their own or write into new
folders, and rank 0 would wait for them forever. The command below re-runs the job's
own overrides as a single run in the job's output dir, writing no Hydra files (its log
is `train_rank<R>.log`: `conf/train.yaml` names it).

Under SLURM, requeueing has one owner: the job's own resume (`sweeps.jobs`, with
submitit's requeue when Hydra's submitit launcher runs it), never Lightning's too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd

from vision_tl.core.launch import Launch
from vision_tl.core.shims import replace_hydra_subprocess_cmd


def rank_command(local_rank: int, module: str = "vision_tl.train") -> tuple[Sequence[str], str]:
    """The command line and working dir for DDP rank `local_rank` of the current Hydra job."""
    hydra_cfg = HydraConfig.get()
    output_dir = str(hydra_cfg.runtime.output_dir).replace('"', '\\"')
    command = [
        sys.executable,
        "-m",
        module,
        *hydra_cfg.overrides.task,
        "hydra.mode=RUN",
        f'hydra.run.dir="{output_dir}"',
        "hydra.output_subdir=null",
        "hydra/hydra_logging=none",
    ]
    return command, get_original_cwd()


def cluster_plugins(launch: Launch) -> list[Any]:
    """Trainer plugins for the cluster `launch` runs on: under SLURM, Lightning's SLURM
    environment with its auto-requeue off (submitit, or the requeued batch script, owns it)."""
    if launch.launcher != "slurm":
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


def use_hydra_rank_command() -> None:
    """Make Lightning's subprocess launchers (Trainer and Fabric) start DDP ranks with
    `rank_command`."""
    replace_hydra_subprocess_cmd(rank_command)
