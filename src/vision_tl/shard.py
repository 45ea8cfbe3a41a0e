"""Convert a folder or manifest into LitData shards: `python -m vision_tl.shard
data.root=DIR shard.out=SHARDS` (then `python -m vision_tl.train data.shards=SHARDS`)."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("shard")
def main(cfg: DictConfig) -> None:
    """Scan and split the data as `train` does, then write its shards (`data.shards`)."""
    from vision_tl.data.shards import ShardSettings
    from vision_tl.training.build import shard_data

    run_command(lambda c: shard_data(c.data, ShardSettings.from_config(c)), cfg)


if __name__ == "__main__":
    main()
