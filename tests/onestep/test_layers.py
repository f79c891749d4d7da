"""The import contracts of pyproject.toml: no cycles, and the layers (commands > runs > training > models)."""
import pytest
from lint_imports import lint_imports


def test_import_contracts_hold():
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("path, module, contract", [
    ("registry.py", "onestep.teachers", "cycles"),          # the registry importing what registers into it
    ("errors.py", "onestep.config", "layers"),              # the leaf importing upwards
    ("teachers/base.py", "onestep.objectives", "layers"),   # a teacher depending on an objective
])
def test_a_wrong_import_breaks_a_contract(path, module, contract):
    result = lint_imports(extra_import=(path, module))
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if " BROKEN" in line]
    assert any(contract in line for line in broken), result.stdout
