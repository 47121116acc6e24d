"""The default rules, message templates and intent model, shipped inside the package.

They are package data (`nudgeflow/config/`), found through `importlib.resources`
so an installed wheel finds them from any directory. nudgeflow is installed
unzipped (wheels always are), so the traversable is a real directory: Jinja2's
file loader and the YAML loader's `file:line` errors need a path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final


def _config_dir() -> Path:
    return Path(str(files("nudgeflow").joinpath("config")))


DEFAULT_RULES: Final = _config_dir() / "rules.yaml"
DEFAULT_TEMPLATES: Final = _config_dir() / "templates"
# The intent model a rules file names as `model: default` (README "Purchase intent").
DEFAULT_INTENT_MODEL: Final = _config_dir() / "intent" / "model.json"
