"""Start-up check of the L3 storage options of any SGLang release, for every backend.

SGLang parses `--hicache-storage-backend-extra-config` (alias `--hicache-storage-backend-config`)
only when the scheduler builds HiCache, after the model weights are loaded, and then fails with a
traceback on invalid JSON or a JSON value that is not an object. `storage_config_errors` applies
SGLang's own reading rules (a JSON string, or `@path` to a .json, .toml, .yaml or .yml file) in the
launcher, and returns one line per problem, each naming the flag. Pure: no sglang import, no
network, never raises.
"""

from __future__ import annotations

import json
import os
from typing import Any

FLAG = "--hicache-storage-backend-extra-config"
ALIAS = "--hicache-storage-backend-config"
EXTRA_DEST = "hicache_storage_backend_extra_config"
BACKEND_DEST = "hicache_storage_backend"
_FLAGS = f"{FLAG} (or {ALIAS})"

# keys SGLang's HiCache pops from the object itself, with the types its newer releases insist on
_TYPED_KEYS: dict[str, tuple[type, ...]] = {
    "prefetch_threshold": (int,),
    "prefetch_timeout_base": (int, float),
    "prefetch_timeout_per_ki_token": (int, float),
    "prefetch_timeout_max": (int, float),
    "hicache_storage_pass_prefix_keys": (bool,),
}


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(v: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array"}.get(type(v), type(v).__name__)


def load_extra_config(raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the parsed object, None) or (None, one-line error) for the flag's value `raw`."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}, None
    if isinstance(raw, dict):
        return raw, None
    if not isinstance(raw, str):
        return None, f"{_FLAGS} must be a JSON object string, got {_type_name(raw)}"
    text = raw.strip()
    if text.startswith("@"):
        path = text[1:]
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".json", ".toml", ".yaml", ".yml"):
            return None, f"{_FLAGS} @{path}: unsupported config file type {ext or '(none)'}; use .json, .toml, .yaml or .yml"
        try:
            if ext == ".json":
                with open(path, encoding="utf-8") as f:
                    value = json.load(f)
            elif ext == ".toml":
                import tomllib

                with open(path, "rb") as f:
                    value = tomllib.load(f)
            else:
                import yaml

                with open(path, encoding="utf-8") as f:
                    value = yaml.safe_load(f)
        except FileNotFoundError:
            return None, f"{_FLAGS} @{path}: no such file"
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{_FLAGS} @{path}: cannot read it ({_short(e)})"
        except Exception as e:  # json/toml/yaml syntax errors: one line, no traceback
            return None, f"{_FLAGS} @{path}: not valid {ext[1:].upper()} ({_short(e, 100)})"
        where = f"{_FLAGS} @{path}"
    else:
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            pos = f" at character {e.pos}" if isinstance(e, json.JSONDecodeError) else ""
            return None, f"{_FLAGS} is not valid JSON ({msg}{pos}): {_short(text)!r}"
        where = _FLAGS
    if not isinstance(value, dict):
        return None, f"{where} must be a JSON object like '{{\"key\": value}}', got {_type_name(value)}: {_short(raw)!r}"
    return value, None


def storage_config_errors(server_args: Any) -> list[str]:
    """One line per problem with the storage backend options in `server_args` (empty: fine).

    Checked for every backend (SGLang's and ours): the extra config must be a JSON object (string
    or @file), and the keys HiCache itself reads must have the types it needs. Works on a
    ServerArgs of any supported release, an argparse Namespace, or any object with the two
    attributes.
    """
    try:
        raw = getattr(server_args, EXTRA_DEST, None)
        backend = getattr(server_args, BACKEND_DEST, None)
        value, err = load_extra_config(raw)
        if err:
            return [err]
        errors = []
        for key, types in _TYPED_KEYS.items():
            if key in value:
                v = value[key]
                ok = isinstance(v, types) and not (bool not in types and isinstance(v, bool))
                if not ok:
                    want = "a boolean" if types == (bool,) else ("an integer" if types == (int,) else "a number")
                    errors.append(f"{_FLAGS}: \"{key}\" must be {want}, got {_type_name(v)} {_short(repr(v), 30)}")
        if backend == "dynamic":
            missing = [k for k in ("backend_name", "module_path", "class_name") if not value.get(k)]
            if missing:
                errors.append(f"--hicache-storage-backend dynamic needs {', '.join(missing)} in {_FLAGS}")
        return errors
    except Exception as e:  # never a traceback from a start-up check
        return [f"{_FLAGS}: cannot check it ({type(e).__name__}: {_short(e)})"]


__all__ = ["ALIAS", "FLAG", "load_extra_config", "storage_config_errors"]
