"""Options declared once: a field of an options dataclass (`PrepOptions`, `BenchOptions`, `SynthOptions`,
`ImageViTOptions`) carries its default, its help text, its allowed values and, where a pipeline exposes it,
the pipeline's name and default for it. The command line's flags, the Kubeflow components' and pipelines'
parameters and the descriptions the Kubeflow UI shows are all read from it (`fields`), never typed again.

    @dataclasses.dataclass(frozen=True)
    class PrepOptions:
        fps: float = option(12.5, "frames per second stored", pipeline="fps")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

_NO_DEFAULT = object()


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, pipeline: str | None = None,
           pipeline_default: Any = _NO_DEFAULT) -> Any:
    """A dataclass field: `default`, the `help` its flag and its pipeline parameter show, the allowed `choices`,
    and `pipeline`: the parameter's name in the `sfa` pipeline (None: not a pipeline parameter), whose default is
    `pipeline_default` where a pod needs another than a workstation (prep's decoding processes)."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "pipeline": pipeline,
                "pipeline_default": default if pipeline_default is _NO_DEFAULT else pipeline_default}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Option:
    """One field of an options dataclass, as the command line and the pipelines see it."""
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    pipeline: str | None
    pipeline_default: Any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def fields(options: type) -> list[Option]:
    """The options of a dataclass declared with `option`, in declaration order."""
    defaults = options()
    out = []
    for f in dataclasses.fields(options):
        if "help" not in f.metadata:
            raise TypeError(f"{options.__name__}.{f.name} is not declared with option() (no help text)")
        value = getattr(defaults, f.name)
        out.append(Option(f.name, type(value), value, f.metadata["help"], f.metadata["choices"],
                          f.metadata["pipeline"], f.metadata["pipeline_default"]))
    return out


def exposed(options: type) -> list[Option]:
    """The options a pipeline exposes (declared with `pipeline=`)."""
    return [o for o in fields(options) if o.pipeline]


def component_parameters(options: type) -> str:
    """`name: type, ...` of the exposed options: a component's parameters, in the source KFP compiles."""
    return ", ".join(f"{o.name}: {o.type.__name__}" for o in exposed(options))


def component_dict(options: type) -> str:
    """`dict(name=name, ...)` of the exposed options: what a component hands to its step."""
    return "dict(" + ", ".join(f"{o.name}={o.name}" for o in exposed(options)) + ")"


def help_texts(options: type) -> dict[str, str]:
    """{name: help} of every option (a component's input descriptions)."""
    return {o.name: o.help for o in fields(options)}
