"""Exception families for errors a user can cause.

Every message names the file or case concerned and says what to do. Code that catches these in batch
commands reports the failing case and carries on with the others.
"""


class ClipsError(Exception):
    """Base class of all user-facing errors of clips_jax."""


class DataError(ClipsError):
    """A study, image, mask or case store is unreadable or inconsistent (bad file, missing tag, wrong grid)."""


class WeightsError(ClipsError):
    """A weight file or checkpoint cannot be read, is unsafe, or does not match the model."""


class ConfigError(ClipsError):
    """A configuration value is invalid or two values contradict each other."""


class ShapeError(ClipsError, ValueError):
    """An array handed to a network or function has a shape it cannot take (e.g. U-Net size not divisible by 16)."""


class DataWarning(UserWarning):
    """Input that was accepted with a change the user should know about (e.g. slices resampled onto a regular
    grid). Library code raises it with `warnings.warn`; the commands print it as one `warning: ...` line."""
