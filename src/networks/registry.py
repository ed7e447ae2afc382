"""Model families by name: the `model` key of a config -> a builder `(config) -> nn.Module`.

A leaf (timm's `_registry.py` direction): it imports nothing of the project, each network module imports
it and registers its builder with `@register_model("name")`, and `src.networks` imports every built-in
network module. A builder takes a config and returns a model that takes uint8 images and holds one
`src.networks.bricks.Standardize` brick.
"""
MODELS = {}


def register_model(name):
    """Decorator: make `builder` the family `name`'s model (a second family of the same name is a mistake)."""
    def register(builder):
        if MODELS.get(name, builder) is not builder:
            raise ValueError(f"model '{name}' is registered twice ({MODELS[name].__module__}, {builder.__module__})")
        MODELS[name] = builder
        return builder
    return register
