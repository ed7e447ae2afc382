"""Named configs, one registry per model family (configs/<family>.py, each registering itself in
src.config.FAMILIES); importing this package registers every built-in family. A new family adds its
module to the import line below. `family(name)` and `find_config(name)` look a family or a config up.

May import: src.config, src.data, src.datasets, src.networks, src.training (the layers below it).
Imported by: src.runner, src.main_loop, src.analysis, src.sweep and the scripts, never by a module below.
"""
import json
from pathlib import Path

from configs import fast, preact_resnet, resnet, simple_cnn, vgg, wrn  # noqa: F401  (each registers its family)
import src.config
from src.config import LEGACY_MODEL, clip
from src.errors import UsageError


def family(config_or_name):
    """The registry of a family, by its name or by a config's `model` key; UsageError if unknown."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.get("model", LEGACY_MODEL)
    if not isinstance(name, str) or name not in src.config.FAMILIES:  # a config.json may hold any JSON there
        raise UsageError(f"unknown model family '{clip(str(name))}'; known: {', '.join(sorted(src.config.FAMILIES))}")
    return src.config.FAMILIES[name]


def find_config(name_or_path, model=None):
    """-> (family registry, config) for a CONFIG given without its runner (sweeps): a `.json` file, whose
    `model` key names the family, or a registered name, looked up in family `model` or else in all."""
    if model is not None:
        return family(model), family(model).get(name_or_path)
    if name_or_path.endswith(".json"):
        try:
            named = json.loads(Path(name_or_path).read_text()).get("model", LEGACY_MODEL)
        except (OSError, ValueError, RecursionError, AttributeError):
            named = LEGACY_MODEL  # the family's own reader names the problem
        registry = family(named if isinstance(named, str) else LEGACY_MODEL)
        return registry, registry.get(name_or_path)
    having = [registry for registry in src.config.FAMILIES.values()
              if name_or_path in registry.names() and name_or_path != "root"]
    if len(having) > 1:
        raise UsageError(f"config '{name_or_path}' is in the families {', '.join(r.model for r in having)}: "
                         "choose with --model=NAME")
    registry = having[0] if having else family(LEGACY_MODEL)  # its get() lists the names it knows
    return registry, registry.get(name_or_path)
