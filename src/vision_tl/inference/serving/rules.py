"""The keys of `serve` (conf/serve.yaml), checked before any work (see `core.validate`);
the keys it shares with `predict` (`top_k`, `precision`, ...) are `inference/rules.py`'s."""

from __future__ import annotations

from vision_tl.core.validate import (
    FLAG,
    Allowed,
    Rules,
    integer,
    is_int,
    number,
    one_of,
    or_null,
    register_rules,
)

# This machine only, or every interface (IPv4, IPv6); ports from 1024 up (no root needed).
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
PORT = Allowed(lambda v: is_int(v) and 1024 <= v <= 65535, "an integer from 1024 to 65535")

RULES = register_rules(
    Rules(
        {
            "serve.host": one_of(*HOSTS),
            "serve.port": PORT,
            "serve.max_batch_size": integer(1),
            "serve.batch_timeout_ms": number(ge=0),
            "serve.max_body_bytes": integer(1),
            "serve.max_images": integer(1),
            "serve.min_side": integer(1),
            "serve.decode_threads": or_null(integer(1), "one per CPU core"),
            "serve.timeout_s": number(gt=0),
            "serve.log_level": one_of("debug", "info", "warning", "error"),
            "serve.access_log": FLAG,
        }
    )
)
