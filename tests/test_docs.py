"""Every shell command in README.md and docs/*.md is exercised: parsed, run at small size, or tied to a test.

Commands are the lines of ```bash blocks (lines ending in ``\\`` joined, ``#`` comment lines and
trailing comments dropped, ``&&`` chains split, leading ``NAME=value`` assignments dropped). Each
is classified by its program (``classify``):

* ``medmeta fit|validate|test ...``: parsed with ``--print_config`` appended (the whole
  LightningCLI configuration, unknown options and values of the wrong type fail); the printed
  configuration is then checked for an unknown ``data.preset``, a ``model.backbone`` that does not
  resolve (``medmeta.networks.resolve_backbone``: unknown name, class path or setting) and for a
  ``data.meta_batch_size`` that does not split across ``trainer.devices × trainer.num_nodes``.
* ``medmeta synth`` and ``medmeta data check`` on a folder a ``synth`` of the same page wrote:
  run for real at 16 pixels, with ``/tmp/...`` paths moved under a temporary folder (one per page,
  so a page is followed top to bottom); ``# ...`` lines right after them (up to the next command
  or blank line) are expected output and must appear in it (lines containing ``...`` are
  skipped). ``data check`` on another path (written right after ``check``), and
  ``medmeta evaluate``/``diagnose`` and ``python benchmarks/*.py``: arguments parsed by the
  command's own argparse parser, nothing run; ``COVERED_BY`` names the tests that run them.
* ``srun``/``sbatch --wrap``: the wrapped command is classified (and srun's task count must equal
  the processes Lightning will start); ``pip install -e .[extras]``, ``pytest``, the virtual
  environment and ``bash benchmarks/gpu_session.sh STAGE``: checked against pyproject.toml, the
  test tree and the script.

All parses and runs happen in ONE subprocess (``_RUNNER``) to pay medmeta's import once.

A page may define files of its own in code blocks whose first line (a docstring or a comment) starts
with the file's name and a colon, e.g. ``my_learners.py:`` or ``my_backbone.yaml:`` (``doc_files``).
They are written to one folder, which is on the runner's ``PYTHONPATH``, and a command argument
equal to such a file name is that file, so the commands of ``docs/extending.md`` parse with its own
learner, backbone and metric classes.

An unclassified command fails with a message. To support a new kind of command, add a branch to
``classify`` (and, if a test runs it end to end, an entry to ``COVERED_BY``). A doc command that
is known to be wrong goes in ``KNOWN_BROKEN`` with the message its check gives; the entry fails
once the doc is fixed, so that it is removed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_PAGES = ("data.md", "algorithms.md", "evaluation.md", "performance.md", "privacy.md", "extending.md")
DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
SMALL_SIZE = "16"  # pixels per side for `medmeta synth` runs

# command prefix -> the tests that run such a command end to end
COVERED_BY: dict[str, tuple[str, ...]] = {
    "medmeta fit": ("tests/test_cli.py::test_fit_then_test_end_to_end",
                    "tests/test_cli.py::test_each_algorithm_config_combines_with_the_data_config",
                    "tests/test_extending.py::test_own_learner_trains_tests_evaluates_and_diagnoses_through_the_cli"),
    "medmeta test": ("tests/test_cli.py::test_fit_then_test_end_to_end",
                     "tests/test_extending.py::test_own_learner_trains_tests_evaluates_and_diagnoses_through_the_cli"),
    "medmeta synth": ("tests/test_cli.py::test_synth_writes_dicom_classes",),
    "medmeta data check": ("tests/test_cli.py::test_data_check_reports_feasibility_and_exit_codes",),
    "medmeta evaluate": ("tests/test_diagnose.py::test_evaluate_command_draws_then_replays_the_same_episodes",
                         "tests/test_reliability.py::test_full_pipeline_on_a_read_only_data_folder"),
    "medmeta predict": ("tests/test_predict.py::test_cli_predicts_and_reports_counts_only",
                        "tests/test_predict.py::test_sigterm_stops_after_a_batch_and_a_rerun_completes",
                        "tests/test_predict.py::test_diagnose_save_adapted_then_predict_gives_diagnoses_probabilities"),
    "medmeta diagnose": ("tests/test_diagnose.py::test_diagnose_writes_every_output",
                         "tests/test_bundle.py::test_saved_bundle_gives_diagnoses_probabilities_through_medmeta_and_monai",
                         "tests/test_reliability.py::test_full_pipeline_on_a_read_only_data_folder",
                         "tests/test_extending.py::test_own_learner_trains_tests_evaluates_and_diagnoses_through_the_cli"),
    "python benchmarks/maml_speed.py --quick": ("tests/test_maml_speed_benchmark.py::test_quick_run_reports_every_implementation",),
    "srun": ("tests/test_ddp.py::test_ddp_meta_gradient_equals_the_single_process_one",),
    # slow tests (pytest -m slow): the minutes-long benchmark scripts end to end
    "python benchmarks/compare.py": ("tests/test_benchmark_scripts.py::test_compare_script_at_small_size",),
    "python benchmarks/data_pipeline.py": ("tests/test_benchmark_scripts.py::test_data_pipeline_script_runs",),
}  # fmt: skip

# (page, text in the command) -> text in its check's failure. Each entry must still fail.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}

# The checker must reject these (self-test): (command, text in the expected failure)
TYPOS: tuple[tuple[str, str], ...] = (
    ("medmeta fit --config configs/quickstart.yaml --data.kshot 5", "does not parse"),
    ("medmeta fit --config configs/quickstart.yaml --model.n_way 4", "does not parse"),
    ("medmeta fitt --config configs/quickstart.yaml", "unclassified"),
    ("medmeta data inspect /tmp/lesions", "unclassified"),
    ("medmeta evaluate --chkpt runs/x/last.ckpt", "arguments do not parse"),
    ("medmeta diagnose --ckpt x.ckpt --support s", "arguments do not parse"),
    ("medmeta predict --bundle m --inputs cohort --out p", "arguments do not parse"),
    ("python benchmarks/maml_speed.py --quik", "arguments do not parse"),
    ("medmeta fit --config configs/quickstart.yaml --data.preset ct-lungs", "unknown preset"),
    ("medmeta fit --config configs/quickstart.yaml --model.backbone resnet13", "unknown backbone 'resnet13'"),
    ("medmeta fit --config configs/quickstart.yaml --model.inner_lr 0.1", "model.algorithm.init_args.inner_lr"),
    ("medmeta fit --config configs/quickstart.yaml --trainer.devices 3", "not a multiple of the 3 processes"),
    ("srun --nodes 2 --ntasks-per-node 2 medmeta fit --config configs/quickstart.yaml --trainer.devices 2", "srun starts 4 tasks"),
    ('pip install -e ".[benchmarks]"', "no extra 'benchmarks'"),
    ("pip install torch", "unclassified"),
    ("pytest -m slowest", "unknown marker 'slowest'"),
    ("rm -rf runs", "unclassified"),
    ("bash benchmarks/gpu_session.sh turbo", "no stage 'turbo'"),
)


@dataclass
class Command:
    """One command of a page, with the comment lines that follow it (possible expected output)."""

    doc: str
    line: int
    argv: list[str]
    expected: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line} {shlex.join(self.argv)}"[:110]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


@dataclass
class Plan:
    """How one command is exercised."""

    how: str
    lightning: list[str] | None = None  # medmeta argv parsed with --print_config
    run: list[str] | None = None  # medmeta argv run in-process
    parse: list[str] | None = None  # medmeta argv, or [script, *argv], parsed by argparse only
    script: bool = False
    covered: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)  # found without running anything
    srun_tasks: int | None = None
    moved: dict[str, str] = field(default_factory=dict)  # doc path -> real path (run commands)


# ---------------------------------------------------------------------------------------------- extraction


def extract_commands(text: str, doc: str) -> list[Command]:
    """The commands of the ```bash blocks of one page, in order."""
    commands: list[Command] = []
    fence: str | None = None
    pending, start, block_commands = "", 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        marker = re.match(r"^\s*```(\S*)\s*$", line)
        if marker and fence is None:
            fence, block_commands = marker.group(1), []
            continue
        if marker and not marker.group(1):
            fence = None
            continue
        if fence not in ("bash", "sh", "shell"):
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = (pending + line).strip(), ""
        if not logical:  # a blank line ends the expected output of the command before it
            block_commands = []
            continue
        if logical.startswith("#"):
            if block_commands:
                block_commands[-1].expected.append(logical.lstrip("#").strip())
            continue
        segments: list[list[str]] = [[]]
        for token in shlex.split(logical, comments=True):
            if token == "&&":
                segments.append([])
            else:
                segments[-1].append(token)
        for argv in segments:
            while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                argv.pop(0)  # NAME=value prefix
            if argv:
                command = Command(doc, start, argv)
                commands.append(command)
                block_commands.append(command)
    return commands


def doc_commands() -> list[Command]:
    return [c for path in DOCS for c in extract_commands(path.read_text(), path.relative_to(REPO).as_posix())]


FILE_BLOCK = re.compile(r'^(?:"""|#)\s*([\w-]+\.(?:py|ya?ml)):')


def doc_files(text: str) -> dict[str, str]:
    """The files a page defines: ```python/```yaml blocks whose first line names the file, by name."""
    files: dict[str, str] = {}
    for fence, body in re.findall(r"^```(python|yaml)\n(.*?)^```$", text, flags=re.M | re.S):
        named = FILE_BLOCK.match(body)
        if named:
            files[named.group(1)] = body
    return files


def write_doc_files(folder: Path) -> dict[str, str]:
    """Every page's own files written to ``folder``: file name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for path in DOCS:
        for name, body in doc_files(path.read_text()).items():
            (folder / name).write_text(body)
            written[name] = str(folder / name)
    return written


# ---------------------------------------------------------------------------------------------- classification


def _option(argv: list[str], *names: str) -> str | None:
    for i, token in enumerate(argv):
        for name in names:
            if token == name and i + 1 < len(argv):
                return argv[i + 1]
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
    return None


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def classify(argv: list[str]) -> Plan:
    """How ``argv`` is exercised; ``Plan.how`` starts with ``unclassified`` when it is not."""
    program, rest = (argv[0] if argv[0] == "." else Path(argv[0]).name), argv[1:]
    if program == "medmeta":
        return _classify_medmeta(rest)
    if program in ("python", "python3") and rest[:2] == ["-m", "venv"]:
        return Plan("environment setup: creates the virtual environment these tests run in (not re-run)")
    if program in ("python", "python3") and rest and rest[0].startswith("benchmarks/") and rest[0].endswith(".py"):
        script = rest[0]
        if not (REPO / script).is_file():
            return Plan("benchmark script", problems=[f"{script} does not exist"])
        key = f"python {script}" + (" --quick" if "--quick" in rest else "")
        covered = COVERED_BY.get(key, ())
        how = "arguments parsed by the script" + (", run by a test" if covered else " (minutes-long benchmark: not run here)")
        return Plan(how, parse=[script, *rest[1:]], script=True, covered=covered)
    if program in (".", "source") and rest == [".venv/bin/activate"]:
        return Plan("environment setup: activates the virtual environment (nothing to check)")
    if program in ("pip", "pip3") and rest[:1] == ["install"]:
        return _classify_pip(rest[1:])
    if program == "pytest":
        return _classify_pytest(rest)
    if program == "srun":
        return _classify_srun(rest)
    if program == "sbatch":
        wrapped = _option(rest, "--wrap")
        if wrapped is None:
            return Plan("unclassified: sbatch without --wrap (put the job's command in --wrap so that it can be checked)")
        plan = classify(shlex.split(wrapped))
        plan.how = f"sbatch --wrap: {plan.how}"
        return plan
    if program == "bash" and rest[:1] == ["benchmarks/gpu_session.sh"]:
        stages = re.findall(r"^(\w+)\)\s*$", (REPO / rest[0]).read_text(), flags=re.M)
        stage = rest[1] if len(rest) > 1 else ""
        problems = [] if stage in stages else [f"benchmarks/gpu_session.sh has no stage {stage!r} (stages: {stages})"]
        return Plan("needs a CUDA GPU: stage name checked against the script only", problems=problems)
    if program in ("for", "mkdir", "cp", "done"):
        # the README's loop that copies a few quickstart cases into a support and a query folder; the same
        # layout is built and run through `medmeta diagnose` by tests/test_diagnose.py
        return Plan("shell set-up of the diagnose example (the layout is exercised by tests/test_diagnose.py)")
    return Plan(f"unclassified: no rule for `{program}`; add one to classify() in tests/test_docs.py")


def _classify_medmeta(rest: list[str]) -> Plan:
    sub = rest[:1]
    if sub and sub[0] in LIGHTNING_SUBCOMMANDS:
        return Plan("parsed with --print_config (LightningCLI)", lightning=rest, covered=COVERED_BY.get(f"medmeta {sub[0]}", ()))
    if sub == ["synth"]:
        return Plan(f"run at {SMALL_SIZE} px in a temporary folder", run=rest, covered=COVERED_BY["medmeta synth"])
    if rest[:2] == ["data", "check"]:
        return Plan("run on the synthetic set written above", run=rest, covered=COVERED_BY["medmeta data check"])
    if sub and sub[0] in ("evaluate", "diagnose", "predict"):
        return Plan("arguments parsed by the command, run by the covering tests", parse=rest,
                    covered=COVERED_BY[f"medmeta {sub[0]}"])  # fmt: skip
    return Plan(f"unclassified: unknown medmeta subcommand {' '.join(rest[:2])!r}; add a rule to _classify_medmeta()")


def _classify_pip(rest: list[str]) -> Plan:
    if len(rest) == 2 and rest[0] == "-e" and re.fullmatch(r"\.(\[[\w,-]+\])?", rest[1]):
        extras = re.findall(r"[\w-]+", rest[1][1:])
        project = _pyproject()["project"]
        known = project.get("optional-dependencies", {})
        problems = [f"pyproject.toml has no extra {extra!r} (extras: {sorted(known)})" for extra in extras if extra not in known]
        if project.get("scripts", {}).get("medmeta") != "medmeta.cli:main":
            problems.append("pyproject.toml does not install the medmeta command")
        return Plan("editable install: the extras and the console script checked in pyproject.toml", problems=problems)
    return Plan(f"unclassified: pip install {' '.join(rest)} (only `pip install -e .[extras]` is checked)")


def _classify_pytest(rest: list[str]) -> Plan:
    problems = []
    declared = {m.split(":")[0].strip() for m in _pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
    expression = _option(rest, "-m")
    for word in re.findall(r"[A-Za-z_]\w*", expression or ""):
        if word not in ("and", "or", "not") and word not in declared:
            problems.append(f"unknown marker {word!r} (declared: {sorted(declared)})")
    for token in rest:
        if token.startswith("tests/"):
            problems += _missing_test(token)
    return Plan("the test suite itself: markers and test paths checked", problems=problems)


def _classify_srun(rest: list[str]) -> Plan:
    inner = next((i for i, t in enumerate(rest) if Path(t).name in ("medmeta", "python", "python3")), None)
    if inner is None:
        return Plan("unclassified: srun without a medmeta or python command")
    options = rest[:inner]
    nodes, per_node = _option(options, "--nodes", "-N"), _option(options, "--ntasks-per-node")
    plan = classify(rest[inner:])
    plan.how = f"srun: {plan.how}"
    plan.covered = (*plan.covered, *COVERED_BY["srun"])
    if nodes and per_node:
        plan.srun_tasks = int(nodes) * int(per_node)
    return plan


def _missing_test(reference: str) -> list[str]:
    """Problems with a ``tests/file.py[::test_name]`` reference."""
    path, _, name = reference.partition("::")
    file = REPO / path
    if not file.is_file():
        return [f"{path} does not exist"]
    name = name.split("[")[0]
    if name and not re.search(rf"^\s*def {re.escape(name)}\(", file.read_text(), flags=re.M):
        return [f"{path} has no test {name}"]
    return []


# ---------------------------------------------------------------------------------------------- jobs and checks


def plan_commands(commands: list[Command], tmp_root: Path) -> dict[str, Plan]:
    """Plans for ``commands`` in order; synth/data-check paths moved under ``tmp_root/<page>``."""
    plans: dict[str, Plan] = {}
    written: dict[tuple[str, str], str] = {}  # (page, doc path) -> real path, from synth commands
    for command in commands:
        plan = classify(command.argv)
        if plan.run is not None:
            _move_paths(command, plan, tmp_root / Path(command.doc).stem, written)
        plans[command.id] = plan
    return plans


def _move_paths(command: Command, plan: Plan, folder: Path, written: dict[tuple[str, str], str]) -> None:
    argv = list(plan.run)
    if argv[0] == "synth":
        out = _option(argv, "--out")
        if out is None:
            plan.problems.append("medmeta synth without --out")
            return
        real = str(folder / out.lstrip("/"))
        written[(command.doc, out)] = real
        argv = [real if token == out else token for token in argv]
        if "--size" not in argv:
            argv += ["--size", SMALL_SIZE]
        plan.moved = {out: real}
    else:  # data check SOURCE ...: SOURCE right after `check`
        source = argv[2] if len(argv) > 2 else ""
        if (command.doc, source) in written:
            plan.moved = {source: written[(command.doc, source)]}
            argv[2] = written[(command.doc, source)]
        elif source.startswith("/tmp/"):
            plan.problems.append(f"data check on {source}, which no earlier `medmeta synth` of {command.doc} writes")
            return
        else:
            plan.how, plan.run, plan.parse = "arguments parsed by the command (no data at that path)", None, argv
            return
    plan.run = argv


def jobs_of(plans: dict[str, Plan], files: dict[str, str] | None = None) -> list[dict]:
    """The runner's jobs; an argument of a Lightning command naming a page's own file becomes its path."""
    jobs, files = [], files or {}
    for key, plan in plans.items():
        if plan.lightning is not None:
            argv = [files.get(token, token) for token in plan.lightning]
            jobs.append({"id": key, "kind": "lightning", "argv": [*argv, "--print_config"]})
        elif plan.run is not None:
            jobs.append({"id": key, "kind": "run", "argv": plan.run})
        elif plan.parse is not None:
            jobs.append({"id": key, "kind": "parse-script" if plan.script else "parse", "argv": plan.parse})
    return jobs


def problems_of(command: Command, plan: Plan, results: dict) -> list[str]:
    """Everything wrong with one command, from its plan and the runner's results."""
    if plan.how.startswith(("unclassified", "srun: unclassified", "sbatch --wrap: unclassified")):
        return [plan.how]
    problems = list(plan.problems)
    for test in plan.covered:
        problems += [f"covering test: {p}" for p in _missing_test(test)]
    result = results.get(command.id)
    if result is None:
        return problems
    log = (result["stdout"][-800:] + result["stderr"][-1200:]).strip()
    if plan.lightning is not None:
        if result["code"] != 0:
            return [*problems, f"does not parse (exit {result['code']}): {log}"]
        config = result["config"]
        if config.get("preset") is not None and config["preset"] not in results["_presets"]:
            problems.append(f"unknown preset {config['preset']!r} (presets: {results['_presets']})")
        if config.get("backbone_problem"):
            problems.append(config["backbone_problem"])
        devices, nodes = config.get("devices"), config.get("num_nodes") or 1
        devices = len(devices) if isinstance(devices, list) else devices
        devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices  # "4" means 4 devices
        if isinstance(devices, int) and devices > 0:
            processes = devices * int(nodes)
            if config.get("meta_batch_size", 0) % processes:
                problems.append(f"data.meta_batch_size={config['meta_batch_size']} is not a multiple of the {processes} "
                                "processes (trainer.devices × trainer.num_nodes): fit would stop")  # fmt: skip
            if plan.srun_tasks is not None and plan.srun_tasks != processes:
                problems.append(f"srun starts {plan.srun_tasks} tasks but Lightning expects {processes} processes")
    elif plan.run is not None:
        if result["code"] != 0:
            return [*problems, f"failed (exit {result['code']}): {log}"]
        output = result["stdout"]
        for line in command.expected:
            if "..." in line or "…" in line:
                continue
            for doc_path, real in sorted(plan.moved.items(), key=lambda item: -len(item[0])):
                line = line.replace(doc_path, real)
            if line not in output:
                problems.append(f"expected output line not printed: {line!r}; output: {output[-800:]}")
    elif plan.parse is not None and result["code"] != 0:
        problems.append(f"arguments do not parse (exit {result['code']}): {log}")
    return problems


_RUNNER = r"""
import argparse, contextlib, io, json, logging, runpy, sys, yaml
logging.basicConfig(level=logging.WARNING, stream=sys.__stderr__)
from medmeta.cli import main
from medmeta.data.presets import PRESETS
from medmeta.networks import resolve_backbone

class Parsed(Exception):
    pass

parse_args = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise Parsed

results = {"_presets": list(PRESETS)}
for job in json.loads(open(sys.argv[1]).read()):
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    if job["kind"].startswith("parse"):
        argparse.ArgumentParser.parse_args = parse_only
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if job["kind"] == "parse-script":
                sys.argv = job["argv"]
                runpy.run_path(job["argv"][0], run_name="__main__")
                code = "ran without parsing arguments"
            else:
                code = main(job["argv"])
    except Parsed:
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except Exception as error:
        code = f"{type(error).__name__}: {error}"
    finally:
        argparse.ArgumentParser.parse_args, sys.argv = parse_args, argv
    result = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()[-3000:]}
    if job["kind"] == "lightning" and code == 0:
        config = yaml.safe_load(out.getvalue()) or {}
        config = config.get(job["argv"][0], config)
        data, model, trainer = config.get("data") or {}, config.get("model") or {}, config.get("trainer") or {}
        try:
            resolve_backbone(model.get("backbone", "conv4"))
            backbone_problem = None
        except ValueError as error:
            backbone_problem = str(error)
        result["config"] = {"preset": data.get("preset"), "meta_batch_size": data.get("meta_batch_size"),
                            "backbone_problem": backbone_problem, "devices": trainer.get("devices"),
                            "num_nodes": trainer.get("num_nodes")}
        result["stdout"] = ""
    results[job["id"]] = result
print(json.dumps(results))
"""


def run_jobs(jobs: list[dict], folder: Path, files_folder: Path | None = None) -> dict:
    """Run every job in one subprocess (one medmeta import) from the repository root (pages' own files importable)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "jobs.json").write_text(json.dumps(jobs))
    path = os.pathsep.join([str(REPO), *([str(files_folder)] if files_folder else [])])
    env = {**os.environ, "MEDMETA_CACHE": str(folder / "cache"), "COLUMNS": "250", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": path}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(folder / "jobs.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- tests

COMMANDS = doc_commands()
TYPO_COMMANDS = [Command("typo", i, shlex.split(text)) for i, (text, _) in enumerate(TYPOS)]
WRONG_OUTPUT = Command("typo-output", 0, shlex.split("medmeta synth --out /tmp/few --classes 3 --patients 2 --images 1"),
                       expected=["wrote 7 DICOM files in 3 lesion classes to /tmp/few"])  # it writes 6  # fmt: skip


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Plan], dict]:
    folder = tmp_path_factory.mktemp("docs")
    files = write_doc_files(folder / "page_files")
    plans = plan_commands(COMMANDS, folder) | plan_commands([*TYPO_COMMANDS, WRONG_OUTPUT], folder)
    return plans, run_jobs(jobs_of(plans, files), folder, folder / "page_files")


def _known_broken(command: Command) -> str | None:
    return next((message for (doc, text), message in KNOWN_BROKEN.items() if doc == command.doc and text in command.text), None)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.id)
def test_doc_command_is_exercised(command: Command, checked: tuple[dict[str, Plan], dict]) -> None:
    plans, results = checked
    problems = problems_of(command, plans[command.id], results)
    broken = _known_broken(command)
    if broken is not None:
        assert any(broken in p for p in problems), (
            f"{command.id}: listed in KNOWN_BROKEN ({broken!r}) but its check now gives {problems}; "
            "if the doc was fixed, remove the entry"
        )
        return
    assert not problems, f"{command.id} ({plans[command.id].how}):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("command", TYPO_COMMANDS, ids=lambda c: c.text)
def test_checker_rejects_wrong_commands(command: Command, checked: tuple[dict[str, Plan], dict]) -> None:
    plans, results = checked
    wanted = TYPOS[command.line][1]
    problems = problems_of(command, plans[command.id], results)
    assert any(wanted in p for p in problems), f"expected a problem with {wanted!r}, got {problems}"


def test_checker_rejects_output_the_command_does_not_print(checked: tuple[dict[str, Plan], dict]) -> None:
    plans, results = checked
    problems = problems_of(WRONG_OUTPUT, plans[WRONG_OUTPUT.id], results)
    assert any("expected output line not printed: 'wrote 7 DICOM files" in p for p in problems), problems
    assert "wrote 6 DICOM files in 3 lesion classes" in results[WRONG_OUTPUT.id]["stdout"]


def test_extraction_joins_lines_splits_chains_and_keeps_expected_output() -> None:
    text = "\n".join([
        "text", "```bash", "# a comment", "python3 -m venv .venv && . .venv/bin/activate  # trailing",
        "MEDMETA_CACHE=/tmp/c medmeta fit --config a.yaml \\", "  --data.k_shot 5", "# expected line", "",
        "# not output: a blank line came first", "```", "```text", "medmeta not-a-command", "```",
    ])  # fmt: skip
    commands = extract_commands(text, "x.md")
    assert [c.argv for c in commands] == [
        ["python3", "-m", "venv", ".venv"], [".", ".venv/bin/activate"],
        ["medmeta", "fit", "--config", "a.yaml", "--data.k_shot", "5"],
    ]  # fmt: skip
    assert commands[2].expected == ["expected line"] and commands[2].line == 5 and commands[0].expected == []


def test_docs_pages_exist_and_readme_and_docs_have_commands() -> None:
    for page in DOC_PAGES:
        assert (REPO / "docs" / page).is_file(), page
    pages = {c.doc for c in COMMANDS}
    assert len({c.id for c in COMMANDS}) == len(COMMANDS), "two commands share an id"
    assert "README.md" in pages and {f"docs/{p}" for p in DOC_PAGES} <= pages, pages
    assert all(_known_broken(c) is None or c.doc == "README.md" for c in COMMANDS)
    for (doc, text), _ in KNOWN_BROKEN.items():
        assert any(c.doc == doc and text in c.text for c in COMMANDS), f"KNOWN_BROKEN entry matches no command: {text!r}"


def test_covering_tests_exist() -> None:
    problems = [p for tests in COVERED_BY.values() for test in tests for p in _missing_test(test)]
    assert not problems, problems


def _slug(heading: str) -> str:
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_and_test_references_resolve(path: Path) -> None:
    """Relative links (and #anchors into pages) point to existing files; `tests/...::test_x` references exist."""
    text = path.read_text()
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            problems.append(f"link to missing {target}")
        elif anchor and resolved.suffix == ".md":
            headings = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", resolved.read_text(), flags=re.M)}
            if anchor not in headings:
                problems.append(f"link to missing heading {target}")
    for reference in re.findall(r"`(tests/[\w/]+\.py(?:::\w+)?)`", text):
        problems += _missing_test(reference)
    assert not problems, problems
