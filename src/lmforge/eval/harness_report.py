"""`lmforge eval --harness TASKS`: lm-evaluation-harness tasks on a run, without exporting it first.

The tasks run through the `lmforge` model type (harness.py) with lm-eval's own task code, so the numbers
are the ones `lm_eval --model lmforge` prints. The results are printed as lm-eval prints them and kept
in eval.json under "harness", next to the sections of lmforge's own measurements.
lm-eval is an optional extra, imported only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .run import EvalError

INSTALL = "--harness needs lm-evaluation-harness: pip install 'lmforge[eval]'"
# Settings of lm-eval's results worth keeping with the numbers (the rest is its run's environment).
KEPT_CONFIG = ("model_num_parameters", "limit", "bootstrap_iters", "random_seed", "fewshot_seed")


@dataclass(frozen=True)
class HarnessOptions:
    """What `lmforge eval --harness` runs (the flags, one to one)."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: float | None = None
    include_path: str | None = None
    apply_chat_template: bool = False
    batch_size: int = 8
    device: str = "auto"
    quantize: str | None = None


def parse_tasks(spec: str) -> tuple[str, ...]:
    """Task names from --harness: comma-separated, as lm_eval --tasks takes them."""
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not tasks:
        raise EvalError("--harness: give one or more task names, e.g. --harness hellaswag,arc_easy")
    return tasks


def _task_manager(opts: HarnessOptions):
    """lm-eval's TaskManager and the task specs to run; one line naming the tasks it does not know.

    Indexing lm-eval's own ~14,000 tasks takes many seconds, so when --include-path holds every task asked
    for, only that folder is indexed.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    if opts.include_path and not Path(opts.include_path).is_dir():
        raise EvalError(f"--include-path {opts.include_path}: no such folder of task YAML files")
    files = [t for t in opts.tasks if t.endswith(".yaml")]
    for path in files:
        if not Path(path).is_file():
            raise EvalError(f"--harness {path}: no such task file")
    names = [t for t in opts.tasks if not t.endswith(".yaml")]
    manager = None
    if opts.include_path:
        manager = TaskManager(include_path=opts.include_path, include_defaults=False)
        if len(manager.match_tasks(names)) < len(names):
            manager = None
    manager = manager or TaskManager(include_path=opts.include_path)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise EvalError(
            f"--harness: no task named {', '.join(unknown)}; give names lm-eval knows (`lm_eval ls tasks`), "
            "a task .yaml file, or --include-path DIR with your task YAML files"
        )
    specs = [*manager.match_tasks(names), *(load_yaml(path, resolve_func=True) for path in files)]
    return manager, specs


def run_harness(run: str | Path, opts: HarnessOptions) -> tuple[dict, str]:
    """Run the tasks on the run; (the "harness" section of eval.json, lm-eval's table of results)."""
    try:
        import lm_eval
        from lm_eval.utils import make_table

        from .harness import LmforgeLM
    except ImportError:
        raise EvalError(INSTALL) from None
    manager, specs = _task_manager(opts)
    lm = LmforgeLM(run=str(run), device=opts.device, batch_size=opts.batch_size, quantize=opts.quantize)
    if opts.apply_chat_template:
        lm.chat_template(True)  # a run without a template fails here, before any task is built
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=opts.num_fewshot,
            limit=opts.limit,
            task_manager=manager,
            apply_chat_template=opts.apply_chat_template,
            log_samples=False,
        )
    except FileNotFoundError as e:  # a task's data_files that are not there
        raise EvalError(f"--harness: a task's data is missing: {e}") from None
    except ConnectionError as e:  # a hub dataset not in the cache, with the hub out of reach
        raise EvalError(
            f"--harness: a task's data could not be fetched ({_first_line(e)}): run once where the "
            "Hugging Face hub is reachable (the data is cached), or give tasks with local data "
            "(--include-path DIR)"
        ) from None
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return harness_section(results, lm, opts), table


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def harness_section(results: dict, lm, opts: HarnessOptions) -> dict:
    """The numbers of lm-eval's results, under its own metric names ("acc,none"), and how they were made."""
    import lm_eval

    config = results.get("config", {})
    return {
        "lm_eval_version": lm_eval.__version__,
        "checkpoint": str(lm.llm.checkpoint) if lm.llm.checkpoint else None,
        "tasks": results["results"],
        "groups": results.get("groups", {}),
        "n_shot": results.get("n-shot", {}),
        "n_samples": results.get("n-samples", {}),
        "versions": results.get("versions", {}),
        "config": {k: config[k] for k in KEPT_CONFIG if k in config},
        "apply_chat_template": opts.apply_chat_template,
        "include_path": opts.include_path,
    }
