"""Who this process is in a multi-process job, known before the Trainer exists.

Lightning learns the global rank when the Trainer is built; vision_tl has to know it
earlier, because a job scans its data, decides whether to skip or resume, and writes its
run folder's files before that. `detect_launch` reads every launcher's variables the way
Lightning's cluster environments do, in Lightning's order:

- `torchrun` (`TORCHELASTIC_RUN_ID`): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `GROUP_RANK`;
- SLURM's `srun`, also under Hydra's submitit launcher (`SLURM_NTASKS`, outside an
  interactive allocation): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NODEID`;
- otherwise Lightning's own: `NODE_RANK` x devices + `LOCAL_RANK` (the local ranks Lightning
  starts itself get `LOCAL_RANK`), of `num_nodes` x devices processes.

When every process of the job was started by its launcher (`Launch.external`), `join`
opens the job's process group before the Trainer (Lightning then uses it), so rank 0 can
make a decision or scan the data once and send the result to every other rank
(`from_rank_zero`). The local ranks Lightning starts itself (`trainer.devices > 1` on one
node) meet only once training begins; rank 0 leaves its results for them in a private
folder they find through its environment (`local_handoff`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_bytes

T = TypeVar("T")

log = logging.getLogger(__name__)

# Lightning's default process-group timeout (lightning.fabric.plugins.collectives).
GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def device_count(devices: Any, accelerator: str = "auto") -> int:
    """Processes per node that `trainer.devices` asks for: a count, a list of device
    indices, or `auto`/-1 (every GPU there is, or one CPU process)."""
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return max(1, len(devices))
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1"):
        import torch

        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu else 1
    try:
        return max(1, int(text))
    except ValueError:
        raise ConfigError(
            f"trainer.devices={devices}: a count, a list of devices, or auto"
        ) from None


def _slurm_launched() -> bool:
    """SLURM started this process's tasks (Lightning's `SLURMEnvironment.detect` rule)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def _int(name: str, default: int = 0) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ConfigError(f"{name}={value} is not a number") from None


@dataclass(frozen=True)
class Launch:
    """This process's place in its job: global rank of `world_size`, local rank on its
    node, node rank; `launcher` names who started the processes."""

    launcher: str  # single | lightning | node_rank | torchrun | slurm
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0

    @property
    def external(self) -> bool:
        """Every process of the job was started outside Lightning (torchrun, srun, or one
        process per node by hand with `NODE_RANK`): they can meet before the Trainer."""
        return self.launcher in ("torchrun", "slurm", "node_rank") and self.world_size > 1

    @property
    def main(self) -> bool:
        """Global rank 0: the one process that writes the job's shared files."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} (node {self.node_rank}, {self.launcher})"


def _launched() -> Launch | None:
    """The `Launch` torchrun's or SLURM's variables describe (None: neither started this
    process), unchecked."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        rank, world = _int("RANK"), _int("WORLD_SIZE", 1)
        node = _int("GROUP_RANK", _int("NODE_RANK"))
        return Launch("torchrun", rank, world, _int("LOCAL_RANK"), node)
    if _slurm_launched():
        rank, world = _int("SLURM_PROCID"), _int("SLURM_NTASKS", 1)
        return Launch("slurm", rank, world, _int("SLURM_LOCALID"), _int("SLURM_NODEID"))
    return None


def detect_launch(num_nodes: int = 1, devices: Any = 1, accelerator: str = "auto") -> Launch:
    """This process's `Launch` from the launcher's variables, checked against the trainer's
    `num_nodes` x `devices`: a task count that does not match is a one-line error (it
    would otherwise hang at the first collective call)."""
    per_node = device_count(devices, accelerator)
    expected = int(num_nodes) * per_node
    asked = f"trainer.num_nodes={num_nodes} x trainer.devices={per_node} = {expected}"
    launch = _launched()
    if launch is not None:
        started = launch.world_size
        if started != expected and launch.launcher == "torchrun":
            raise ConfigError(
                f"torchrun started {started} processes but {asked}: make "
                "--nnodes x --nproc-per-node match them"
            )
        if started != expected:
            raise ConfigError(
                f"SLURM started {started} tasks but {asked}: set --nodes to "
                "trainer.num_nodes and --ntasks-per-node to trainer.devices"
            )
        return launch
    node, local = _int("NODE_RANK"), _int("LOCAL_RANK")
    if expected == 1:
        return Launch("single")
    if node >= int(num_nodes):
        raise ConfigError(f"NODE_RANK={node} but trainer.num_nodes={num_nodes}")
    if int(num_nodes) > 1 and per_node > 1:
        raise ConfigError(
            f"{asked} started by hand with NODE_RANK: start every process with its launcher "
            "instead (torchrun --nproc-per-node, or srun --ntasks-per-node), so that all ranks "
            "agree before training"
        )
    launcher = "node_rank" if int(num_nodes) > 1 else "lightning"
    return Launch(launcher, node * per_node + local, expected, local, node)


def launch_from_trainer(trainer: Any) -> Launch:
    """`detect_launch` for a `trainer` config node (or mapping)."""
    get = trainer.get
    return detect_launch(
        int(get("num_nodes", 1) or 1), get("devices", 1), str(get("accelerator", "auto"))
    )


def rank_suffix(devices: Any = 1) -> str:
    """`_rank<R>` for every process but global rank 0 (one log file per rank), from the
    launcher's variables alone (Hydra resolves it before any config is checked)."""
    launched = _launched()
    if launched is not None:
        rank = launched.rank
    else:
        try:
            per_node = device_count(devices, "cpu")
        except ConfigError:
            per_node = 1
        rank = _int("NODE_RANK") * per_node + _int("LOCAL_RANK")
    return f"_rank{rank}" if rank else ""


def adopt(launch: Launch) -> None:
    """Make Lightning's rank-zero-only logging and writing follow `launch` from now on
    (Lightning sets the same value itself once the Trainer exists)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = launch.rank


def _main_address(launch: Launch) -> tuple[str, int]:
    """Where rank 0 listens, as Lightning's environment for this launcher says."""
    if launch.launcher == "slurm":
        from lightning.fabric.plugins.environments import SLURMEnvironment

        environment = SLURMEnvironment()
        return environment.main_address, environment.main_port
    address = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = os.environ.get("MASTER_PORT")
    if not port:
        raise ConfigError(
            f"{launch.describe()}: set MASTER_ADDR and MASTER_PORT (rank 0's host and a free "
            "port) on every node"
        )
    return address, int(port)


def join(launch: Launch, accelerator: str = "auto") -> bool:
    """Open the job's process group now when every rank was started externally, on the
    backend Lightning would choose (NCCL on GPUs, else Gloo); True when this call opened it.
    Lightning's DDP strategy finds it open and uses it."""
    import torch
    import torch.distributed as dist

    if not launch.external or not dist.is_available() or dist.is_initialized():
        return False
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    address, port = _main_address(launch)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(launch.rank), str(launch.world_size)
    os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
    os.environ.setdefault("NODE_RANK", str(launch.node_rank))
    if gpu:
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(
        "nccl" if gpu else "gloo",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=GROUP_TIMEOUT,
    )
    return True


def grouped() -> bool:
    """Whether this process is in an open process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_rank() -> tuple[int, int]:
    """(rank, world size) in the open process group; (0, 1) without one."""
    if not grouped():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def gathered(compute: Callable[[], T]) -> list[T]:
    """Every rank's `compute()`, in rank order, on every rank (`[compute()]` without a
    group). An exception on any rank is raised on all of them, so none waits forever."""
    if not grouped():
        return [compute()]
    import torch.distributed as dist

    try:
        mine: tuple[str, Any] = ("ok", compute())
    except Exception as err:  # sent on, then raised on every rank
        mine = ("error", err)
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, mine)
    for kind, value in values:
        if kind == "error":
            raise value
    return [value for _, value in values]


# The folder where rank 0 leaves results for the local ranks Lightning starts.
LOCAL_HANDOFF_ENV = "VISION_TL_LOCAL_HANDOFF"


@contextlib.contextmanager
def local_handoff(launch: Launch) -> Iterator[None]:
    """While rank 0 of a job whose other ranks Lightning starts runs, a private folder
    (named in its environment, which they inherit) where `from_rank_zero(...,
    handoff=NAME)` leaves its results for them; removed afterwards. Elsewhere, nothing."""
    if launch.launcher != "lightning" or not launch.main or launch.world_size < 2:
        yield
        return
    folder = tempfile.mkdtemp(prefix="vision_tl_handoff_")
    previous = os.environ.get(LOCAL_HANDOFF_ENV)
    os.environ[LOCAL_HANDOFF_ENV] = folder
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCAL_HANDOFF_ENV, None)
        else:
            os.environ[LOCAL_HANDOFF_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def handed_over(handoff: str) -> Any | None:
    """On a local rank Lightning started, the result named `handoff` that rank 0 left in
    the handoff folder (`local_handoff`); None elsewhere, or when rank 0 left none."""
    folder = os.environ.get(LOCAL_HANDOFF_ENV)
    if not folder or _int("LOCAL_RANK") == 0:
        return None
    path = Path(folder) / f"{handoff}.pkl"
    return pickle.loads(path.read_bytes()) if path.is_file() else None


def _handed(handoff: str, compute: Callable[[], T]) -> T:
    """Without a process group: rank 0's result from the handoff folder on a local rank
    Lightning started, else `compute()` (left there for them on rank 0)."""
    folder = os.environ.get(LOCAL_HANDOFF_ENV)
    if not folder:
        return compute()
    given = handed_over(handoff)
    if given is not None:
        log.info("The %s rank 0 made, not made again here", handoff)
        return given
    value = compute()
    if _int("LOCAL_RANK") == 0:
        path = Path(folder) / f"{handoff}.pkl"
        write_bytes(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return value


def from_rank_zero(compute: Callable[[], T], handoff: str | None = None) -> T:
    """`compute()` on global rank 0, its result sent to every other rank of the open process
    group (pickled); without one, `compute()` here, or with `handoff` (a name) rank 0's
    result on the local ranks Lightning starts (`local_handoff`). Rank 0's exception reaches
    every rank, so no rank waits for a result that will not come."""
    if not grouped():
        return _handed(handoff, compute) if handoff else compute()
    import torch.distributed as dist

    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute())
        except Exception as err:  # sent on, then raised here too
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_agree(value: Any, what: str) -> None:
    """A one-line error on every rank when the ranks of the open group hold different
    `value`s (a run folder each rank resolved itself, a config)."""
    values = gathered(lambda: value)
    if any(v != values[0] for v in values):
        shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values[:4]))
        raise ConfigError(f"the ranks disagree on {what} ({shown})")
