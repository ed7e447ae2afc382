"""The papers' networks and the bricks they share, one module per architecture; and model size.

Each network module registers its builder in `src.networks.registry.MODELS` (a leaf) when imported; this
package imports them all. May import: src.data, src.networks.*, and the layers below (src.training,
src.runs, src.config, src.files, src.errors). Imported by: src.models, configs, and the layers above.
"""
from src.networks import fast, preact_resnet, resnet, vgg, wrn  # noqa: F401  (each registers its model)
