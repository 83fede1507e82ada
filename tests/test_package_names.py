"""No top-level package of ours has the name of a module another installed distribution provides.

Ours sits first on sys.path (the repository root or the editable install), so a clash does not fail
where it happens but wherever that distribution is imported: transformers 5.25 imports Hugging
Face's `kernels`, and our former `kernels/` package broke every DeepseekV3 import with an
ImportError far from the cause."""

from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = "kimi-moe"  # pyproject.toml's project name


def _our_packages() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def test_our_packages_are_the_ones_pyproject_includes():
    include = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("include = ["))
    for name in _our_packages():
        assert f'"{name}*"' in include, f"{name}/ is a package but pyproject.toml does not include it"


def test_no_installed_distribution_provides_a_module_named_like_ours():
    provided = packages_distributions()  # top-level module name -> distributions that install it
    clashes = {name: others for name in _our_packages()
               if (others := [d for d in provided.get(name, []) if d.replace("_", "-").lower() != OURS])}
    assert clashes == {}, f"installed distributions provide modules our packages shadow: {clashes}"
