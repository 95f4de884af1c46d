"""Compatibility shim for kvtuner_hicache's plugin while it still imports this module.

The L3 backends are their own plugin now (`kvtuner_hicache_l3.plugin`, entry point
`kvtuner_hicache_l3`). Importing this module registers that plugin's hooks (idempotent, so the
entry point and this shim never register them twice); `HOOKS` stays empty for the same reason.
- `extend_parser(parser)`: `kvtuner_hicache_l3.plugin.extend_parser`.
- `preflight_errors(server_args)`: `kvtuner_hicache_l3.plugin.startup_errors` (the options of every
  backend, then the juicefs/lmcache engines), one line per problem.
"""

from __future__ import annotations

from typing import Any

from kvtuner_hicache_l3.plugin import extend_parser, register, startup_errors

register()
HOOKS: list[tuple[str, Any, Any]] = []


def preflight_errors(server_args: Any) -> list[str]:
    return startup_errors(server_args)


__all__ = ["HOOKS", "extend_parser", "preflight_errors"]
