"""Named configs, one registry per model family (configs/<family>.py); importing this package
registers every built-in family in src.config.FAMILIES. A new family adds its module here."""
from configs import fast, preact_resnet, resnet, simple_cnn, vgg, wrn  # noqa: F401
