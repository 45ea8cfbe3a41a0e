"""Convert a folder or manifest into LitData shards: `python -m vision_tl.shard
data.root=DIR shard.out=SHARDS` (then `python -m vision_tl.train data.shards=SHARDS`)."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


def _shard(cfg: DictConfig) -> dict:
    from vision_tl.core.runtime import available_cpus
    from vision_tl.data.shards import ShardDecode, ShardSettings
    from vision_tl.training.build import plain, shard_data

    node = plain(cfg.shard)
    decode = ShardDecode(tuple(cfg.data.background), node["max_side"], node["quality"])
    settings = ShardSettings(
        out=node["out"],
        workers=node["workers"] or available_cpus(),
        chunk_bytes=node["chunk_bytes"],
        decode=decode,
        parts=node["parts"],
        part=node["part"],
        merge=node["merge"],
        seed=int(cfg.data.seed),
    )
    return shard_data(cfg.data, settings)


@command("shard")
def main(cfg: DictConfig) -> None:
    """Scan and split the data as `train` does, then write its shards (`data.shards`)."""
    run_command(_shard, cfg)


if __name__ == "__main__":
    main()
