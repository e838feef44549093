"""The write side of the data: sources into shards. `annotations` parses the six datasets' official files,
`video` decodes videos (PyAV), `shards` is `sfa data prep` (videos -> WebDataset shards + manifest.json), and
`synth` writes the synthetic dataset as its sources. Training reads shards through `sfa_vivit.data.manifest`
and `sfa_vivit.data.reader` alone, and never imports this package."""

from sfa_vivit.data.prep.shards import PrepError, PrepOptions, SplitOptionsMismatch, prepare

__all__ = ["PrepError", "PrepOptions", "SplitOptionsMismatch", "prepare"]


def __getattr__(name: str):
    """The rest of the former `sfa_vivit.data.prep` module: now in `sfa_vivit.data.prep.shards`."""
    from sfa_vivit import _moved
    from sfa_vivit.data.prep import shards
    if not hasattr(shards, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _moved.moved_attribute(__name__, name, {name: "sfa_vivit.data.prep.shards"})
