"""Example run configs (YAML), shipped with the package: `megakv-train $(python -c 'import megakv.recipes as r;
print(r.path("demo"))')`, or point megakv-train at the file in the source tree."""

from pathlib import Path

RECIPES = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The YAML file of a recipe by name (demo, tiny)."""
    candidate = RECIPES / f"{name}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
        raise FileNotFoundError(f"no recipe {name!r}; known: {known}")
    return candidate
