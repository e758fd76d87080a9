"""Every code block of README.md and docs/*.md runs as written.

* ``python`` blocks run as scripts, each in a fresh directory, all in one subprocess (imports paid
  once). A block whose first line is ``# tasks/<name>/<file>.py`` is a file of an example task: those
  files are written into a package beside the installed tasks and the task runs two batches.
* ``bash`` blocks: every ``bgn-task`` command parses as written (``--print_config`` for a run,
  ``--dry-run`` for a sweep; nothing trains), and every ``python benchmarks/X.py`` script exists.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.runner.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FILE_HEADER = re.compile(r"^# (tasks/\w+/\w+\.py)\n")


def _blocks(lang: str) -> list[tuple[str, str]]:
    """``(where, code)`` of every ``lang`` block, ``where`` as ``file:line``."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in BLOCK.finditer(text):
            if match.group(1) == lang:
                line = text[: match.start()].count("\n") + 1
                found.append((f"{doc.relative_to(ROOT)}:{line}", match.group(2)))
    return found


RUNNER = r'''
import os, runpy, sys, tempfile, traceback
failed = []
for where, path in zip(sys.argv[1::2], sys.argv[2::2]):
    os.chdir(tempfile.mkdtemp(prefix="doc-"))
    try:
        runpy.run_path(path, run_name="__main__")
    except BaseException:
        failed.append(where)
        print(f"=== {where} failed:", file=sys.stderr)
        traceback.print_exc()
print("FAILED:", " ".join(failed), file=sys.stderr)
sys.exit(1 if failed else 0)
'''


def test_python_blocks_run(tmp_path: Path) -> None:
    scripts: list[str] = []
    for i, (where, code) in enumerate(_blocks("python")):
        if FILE_HEADER.match(code):
            continue  # an example task's file: test_example_task_files_run
        script = tmp_path / f"block{i}.py"
        script.write_text(code)
        scripts += [where, str(script)]
    assert scripts, "no python blocks found"
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *scripts],
        capture_output=True, text=True, timeout=600, env=_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "BGN_DATA_DIR": str(tmp_path / "data")})
    return env


def test_example_task_files_run(tmp_path: Path) -> None:
    """The files a doc shows for a new task make a task that the runner finds and runs."""
    files = {}
    for _, code in _blocks("python"):
        header = FILE_HEADER.match(code)
        if header:
            files[header.group(1)] = code
    if not files:
        pytest.skip("no example task in the docs")
    for path, code in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(code)
    name = Path(next(iter(files))).parts[1]
    run = (
        "import sys, tasks; tasks.__path__.append(sys.argv[1] + '/tasks'); "
        "from tasks.runner.cli import main; "
        f"sys.exit(main(['{name}', '--output', sys.argv[1] + '/out', '--max-epochs', '1', "
        "'--trainer.limit_train_batches', '2', '--trainer.limit_val_batches', '2', "
        "'--trainer.limit_test_batches', '2', '--trainer.enable_progress_bar', 'false']))"
    )
    done = subprocess.run([sys.executable, "-c", run, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=_env(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "out" / "results.json").is_file()


def _commands() -> list[tuple[str, list[str]]]:
    """Every command line of the bash blocks: continuations joined, comments and prompts dropped."""
    commands = []
    for where, code in _blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                commands.append((where, shlex.split(line)))
    return commands


COMMANDS = _commands()


@pytest.mark.parametrize(
    ("where", "argv"),
    [(w, a) for w, a in COMMANDS if a[0] == "bgn-task"],
    ids=lambda v: v if isinstance(v, str) else " ".join(v[1:3]),
)
def test_bgn_task_commands_parse(where: str, argv: list[str], capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    args = argv[1:]
    if args[0] in ("-h", "--help"):
        assert main(args) == 0
        return
    if args[0] == "bench":
        own, sep, rest = (args[: args.index("--")], ["--"], args[args.index("--") + 1 :]) if "--" in args \
            else (args, [], [])  # fmt: skip
        assert main([*own, "--dry-run", *sep, *rest]) == 0, f"{where}: {shlex.join(argv)}"
        return
    if args[0] == "report":  # its folders come from a bench run: check that the options parse
        from tasks.runner.paper_report import _parser

        assert _parser().parse_args(args[1:]).folders, f"{where}: {shlex.join(argv)}"
        return
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0, f"{where}: {shlex.join(argv)}: {capsys.readouterr().err[-500:]}"


def test_benchmark_scripts_named_in_the_docs_exist() -> None:
    scripts = {a[1] for _, a in COMMANDS if a[0] == "python" and a[1:2] and a[1].startswith("benchmarks/")}
    assert scripts and all((ROOT / s).is_file() for s in scripts), sorted(scripts)
