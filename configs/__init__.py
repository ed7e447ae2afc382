"""Named configs, one registry per model family (configs/<family>.py); importing this package
registers every built-in family in src.config.FAMILIES. A new family adds its module here."""
from configs import simple_cnn  # noqa: F401
