"""Options declared once: every data-prep and memory-benchmark option lives in its dataclass (name, type,
default, help, pipeline name); the command line, the Kubeflow components and the `sfa` pipeline read it there."""

import re
from pathlib import Path

import pytest

from sfa_vivit.core import options
from sfa_vivit.data.prep import PrepOptions
from sfa_vivit.tools.membench import BenchOptions

SRC = Path(__file__).resolve().parents[1] / "src" / "sfa_vivit"
DECLARED_IN = {PrepOptions: SRC / "data" / "prep" / "shards.py", BenchOptions: SRC / "tools" / "membench.py"}
# Where the options were typed again before (the layers that now derive them).
READERS = [SRC / "cli.py", SRC / "kubeflow" / "components.py", SRC / "kubeflow" / "pipelines.py",
           SRC / "kubeflow" / "steps.py", SRC / "kubeflow" / "runner.py"]


@pytest.mark.parametrize("cls", [PrepOptions, BenchOptions], ids=lambda c: c.__name__)
def test_each_option_is_declared_in_one_place(cls):
    """No reader declares an option again: no typed parameter or default under its pipeline name, no step
    function that lists the options one by one, no help text anywhere but in its declaration."""
    import inspect

    from sfa_vivit.kubeflow import steps
    sources = {path: path.read_text() for path in SRC.rglob("*.py")}
    listed = {name for f in (steps.prepare_part, steps.prepare_data, steps.memory_benchmark)
              for name in inspect.signature(f).parameters}
    for o in options.fields(cls):
        for path in READERS:
            text = sources[path]
            if o.pipeline:
                typed = re.findall(rf"\b{o.pipeline}\s*:\s*(?:int|float|str|bool)\b", text)
                assert not typed, f"{path.name} declares {cls.__name__}.{o.name} again: {typed}"
            assert not re.search(rf"\b{o.name}\s*=\s*[\w.]*(?:_PREP|BENCH|defaults|bench)\.{o.name}\b", text), \
                f"{path.name} takes {o.name}'s default itself"
        assert o.name not in listed, f"a step function lists {cls.__name__}.{o.name} as a parameter of its own"
        holders = [path.name for path, text in sources.items() if o.help[:40] in text]
        assert holders == [DECLARED_IN[cls].name], f"{cls.__name__}.{o.name}'s help text is in {holders}"
    # The components' sources name no option: their parameters are filled in from the declarations.
    components = sources[SRC / "kubeflow" / "components.py"]
    assert "{prep}" in components and "{bench}" in components


@pytest.mark.parametrize("cls,command", [(PrepOptions, ["data", "prep"]), (BenchOptions, ["membench"])],
                         ids=["prep", "membench"])
def test_the_command_line_reads_the_declarations(cls, command):
    from sfa_vivit.cli import build_parser
    parser = build_parser()
    sub = parser
    for word in command:
        sub = next(a for a in sub._actions if a.dest in ("command", "data_command")).choices[word]
    actions = {a.dest: a for a in sub._actions}
    for o in options.fields(cls):
        action = actions[o.name]
        assert action.option_strings == [o.flag] and action.default == o.default and action.help == o.help
        assert action.choices == (list(o.choices) if o.choices and not isinstance(action.choices, tuple)
                                  else o.choices)


def test_the_components_and_the_pipeline_read_the_declarations():
    from sfa_vivit.kubeflow import components as c
    from sfa_vivit.kubeflow.pipelines import build_sfa
    for component, cls in ((c.prepare_shards, PrepOptions), (c.prepare_data, PrepOptions),
                           (c.memory_benchmark, BenchOptions)):
        inputs = component.component_spec.inputs
        for o in options.exposed(cls):
            assert inputs[o.name].description == f"{o.help}.", (component.name, o.name)
    pipeline = build_sfa("cpu").component_spec.inputs
    for cls in (PrepOptions, BenchOptions):
        for o in options.exposed(cls):
            spec = pipeline[o.pipeline]
            assert spec.default == o.pipeline_default and o.help in spec.description, o.pipeline
    # The pipeline's own parameters keep their texts; the prep pods decode with 4 processes, not one per CPU.
    assert pipeline["prep_workers"].default == 4 and pipeline["membench_steps"].default == 2
    assert pipeline["dataset"].description == c.ARGUMENTS["dataset"]


def test_an_option_without_a_declaration_is_refused():
    import dataclasses

    @dataclasses.dataclass
    class Bare:
        size: int = 3

    with pytest.raises(TypeError, match="Bare.size is not declared with option"):
        options.fields(Bare)
