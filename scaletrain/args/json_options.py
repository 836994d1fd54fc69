"""Dict-valued options that HF accepts as a dict, inline JSON or the path of a JSON file."""
from __future__ import annotations

import json
from typing import Union


def read_json_option(name: str, value: Union[str, dict]) -> dict:
    """`value` as a dict: a dict as it is, inline JSON (HF's command line accepts it), or a JSON file's object."""
    if isinstance(value, dict):
        return dict(value)
    if value.lstrip().startswith("{"):
        try:
            return dict(json.loads(value))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}={value!r} is not valid JSON: {exc}") from exc
    try:
        with open(value) as fh:
            loaded = json.load(fh)
    except FileNotFoundError as exc:
        raise ValueError(f"{name}={value!r}: no such file; pass a dict or the path of a JSON file") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}={value!r} is not valid JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{name}={value!r} must hold a JSON object")
    return loaded
