"""The Hydra side of vision_tl's Optuna search: settings in, jobs out through Hydra's
launcher. The search itself is `vision_tl.sweeps.optuna_sweeper`; this module stays light
because Hydra imports every plugin module on each start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class OptunaSweeper(Sweeper):
    """Each invocation is one worker of the study `storage` + `study_name` name (see
    conf/hydra/sweeper/optuna.yaml for the settings)."""

    def __init__(self, sampler: Any = None, params: Any = None, **settings: Any) -> None:
        self.sampler = sampler
        self.params = params
        self.settings = settings
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.utils import instantiate

        from vision_tl.core.io import write_text
        from vision_tl.core.logs import quiet_third_party
        from vision_tl.sweeps.optuna_sweeper import (
            OptunaWorker,
            search_space,
            worker_id,
            write_results,
        )
        from vision_tl.sweeps.study import StudySettings

        assert self.config is not None and self.launcher is not None
        quiet_third_party()
        settings = StudySettings.from_config(self.settings)
        params = OmegaConf.to_container(self.params) if self.params is not None else {}
        space, fixed = search_space(params or {}, arguments)

        def sampler(worker: int | None) -> Any:
            if self.sampler is None:
                return None
            node = self.sampler
            seed = node.get("seed") if "seed" in node else None
            offset = {} if seed is None or worker is None else {"seed": int(seed) + worker}
            return instantiate(node, **offset)

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        # As Hydra's basic sweeper does: the report reads the search and the study from it.
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_text(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))
        worker = OptunaWorker(
            settings,
            sampler,
            n_trials=self.settings.get("n_trials", 20),
            n_jobs=self.settings.get("n_jobs", 1),
            sweep_dir=sweep_dir,
            launch=lambda jobs, first: self.launcher.launch(jobs, initial_job_idx=first),
            worker=worker_id(self.settings.get("worker_id")),
        )
        study = worker.run(space, fixed)
        write_results(study, sweep_dir / "optimization_results.yaml")
        return study
