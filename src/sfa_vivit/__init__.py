"""sfa-vivit: train ViViT factorised-encoder video transformers the conventional way and the SFA way."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sfa-vivit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from sfa_vivit import _moved

_moved.install()        # the old names of moved modules (sfa_vivit.checkpoints, ...) for one more release
