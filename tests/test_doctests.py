"""Every docstring example in the library runs, so shape formulas cannot drift."""

import doctest
import importlib
import pkgutil

import pytest

import scratchseg

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(scratchseg.__path__, prefix="scratchseg.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_the_examples_are_there():
    """The op and model files carry shape examples: a sweep that found none would prove nothing."""
    with_examples = []
    for name in MODULES:
        module = importlib.import_module(name)
        finder = doctest.DocTestFinder()
        if any(t.examples for t in finder.find(module)):
            with_examples.append(name)
    for expected in ("scratchseg.functional.conv", "scratchseg.functional.pooling", "scratchseg.autograd",
                     "scratchseg.models.unet", "scratchseg.backend"):
        assert expected in with_examples
