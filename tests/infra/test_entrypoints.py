"""Every `python -m jobs.X ...` that infra/ runs exists and builds a valid job config (issue #14).

The commands come from the RayJob entrypoints (also the one inside the CronJob's ConfigMap template) and from
what infra/ray/submit.sh hands to `ray job submit`. Each goes through the project's own parser and then
`merge_options` + `build_config`, the path `jobs.cli.main` takes before it runs a job, so a renamed flag, a bad
choice or a missing required option fails here and not on the cluster.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra_files import ROOT, SUBMIT_SH, configmap_entries, containers, manifests, rel, yaml_files

from jobs.cli import OPTION_FIELDS, build_config, build_parser, merge_options
from pipeline.config import flag_of


def module_subcommand(module: str) -> str:
    """The `embedlake` subcommand a `jobs.X` module runs: the first item of its `main([...])` call."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    calls = [node for node in ast.walk(ast.parse(Path(spec.origin).read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main"
             and node.args and isinstance(node.args[0], ast.List) and node.args[0].elts
             and isinstance(node.args[0].elts[0], ast.Constant)]
    assert len(calls) == 1, f"{module}: expected one main([\"<subcommand>\", ...]) call, found {len(calls)}"
    return calls[0].args[0].elts[0].value


def check_job_command(argv: list[str], where: str, capsys: pytest.CaptureFixture) -> None:
    """`python -m jobs.X FLAGS...`: the module exists, its flags parse, and they build a JobConfig."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"{where}: not `python -m jobs.X`: {argv}"
    subcommand = module_subcommand(argv[2])
    try:
        args = build_parser().parse_args([subcommand, *argv[3:]])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse: {capsys.readouterr().err.strip().splitlines()[-1]}")
    try:
        opts = merge_options(args)
        # What main's cmd_<subcommand> pops before build_config: the subcommand's own options (--dry-run,
        # --delete-missing, --partitions ...), which set no config field.
        for name in [k for k in opts if k not in OPTION_FIELDS and k != "storage_option"]:
            opts.pop(name)
        build_config(opts)
    except ValueError as err:
        pytest.fail(f"{where}: `{shlex.join(argv)}`: {err}")


KUBERAY_FILES = [p for p in yaml_files() if "kuberay" in p.parts]
JOB_COMMAND = "python -m jobs."


def strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, text) of every string in a parsed manifest, except the texts `documents()` parses as embedded
    manifests (ConfigMap data, runtimeEnvYAML): those are walked as documents of their own."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from strings(item, f"{path}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            if key not in ("data", "runtimeEnvYAML"):
                yield from strings(value, f"{path}.{key}" if path else str(key))


def job_commands(path: Path | None = None) -> list[tuple[str, list[str]]]:
    """(where, argv) of every `python -m jobs.X ...` in the manifests (of one file's, if `path`): a string that
    is the command (a RayJob's entrypoint) or a container's command + args."""
    found = []
    for doc in manifests():
        if path is not None and not doc.where.startswith(rel(path) + "#"):
            continue
        found += [(f"{doc.where} {where}", shlex.split(text)) for where, text in strings(doc.body)
                  if text.startswith(JOB_COMMAND)]
        for c in containers(doc):
            argv = [*(c.get("command") or []), *(c.get("args") or [])]
            if argv[:2] == ["python", "-m"]:
                found.append((f"{doc.where} container {c['name']}", argv))
    return found


def test_every_job_command_is_found_and_none_escapes():
    assert {where for where, _ in job_commands()} == {
        "infra/kuberay/rayjob-embed.yaml#0 spec.entrypoint",
        "infra/kuberay/cronjob-reembed.yaml#3 data.rayjob.yaml spec.entrypoint",
    }
    # A job command inside a shell script, say, would not be checked: make it a command of its own.
    hidden = [(d.where, where) for d in manifests() for where, text in strings(d.body)
              if "-m jobs." in text and not text.startswith(JOB_COMMAND)]
    assert not hidden, f"job commands this test cannot check: {hidden}"


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=rel)
def test_job_commands_build_a_job_config(path: Path, capsys):
    for where, argv in job_commands(path):
        check_job_command(argv, where, capsys)


def submit_sh_arguments(*extra: str) -> list[str]:
    """The arguments submit.sh gives `ray job submit`, expanded by bash itself with the script's own defaults.

    `ray` is a shell function here that prints its arguments, so nothing is submitted; Ray's own CLI parser
    reads them in the test below.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("CORPUS", "INPUT", "OUTPUT", "MODEL", "ACTORS", "SUBMISSION_ID", "NO_WAIT", "RAY_ADDRESS")}
    out = subprocess.run(
        ["bash", "-c", 'ray() { printf "%s\\0" "$@"; }; . "$0" "$@"', str(SUBMIT_SH), *extra],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    return out.split("\0")[:-1]


def test_submit_sh_submits_a_valid_job_through_ray_job_submit(capsys):
    from ray.dashboard.modules.job.cli import submit

    args = submit_sh_arguments("--index")
    assert args[:2] == ["job", "submit"], args
    try:
        params = submit.make_context("submit", args[2:]).params  # Ray's own `ray job submit` parser
    except Exception as err:  # click's UsageError and friends
        pytest.fail(f"{rel(SUBMIT_SH)}: `ray {shlex.join(args)}` is refused by ray job submit: {err}")
    assert (ROOT / params["runtime_env"]).is_file(), params["runtime_env"]  # relative to the repo root it cds to
    assert params["submission_id"].startswith("embed-docs-"), params["submission_id"]
    entrypoint = list(params["entrypoint"])
    assert entrypoint[-1] == "--index", "extra arguments of submit.sh must reach `python -m jobs.embed`"
    check_job_command(entrypoint, rel(SUBMIT_SH), capsys)


def test_every_configmap_entry_is_a_manifest_or_a_loadable_job_config(tmp_path, capsys):
    """A ConfigMap here carries either a manifest (checked as one by test_manifests) or a job config, which
    must load through `--config` as a job reads it. Required options it leaves to the command line get
    placeholders; every key and value it sets is checked."""
    entries = configmap_entries()
    assert entries, "the CronJob's ConfigMap carries the RayJob template"
    for doc in entries:
        if doc.is_manifest:
            continue
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump(doc.body))
        given = {str(k).replace("-", "_") for k in doc.body}
        missing = [flag_of(f) for dest, (_, f) in OPTION_FIELDS.items()
                   if f.default is dataclasses.MISSING and dest not in given]
        placeholders = [word for flag in missing for word in (flag, "placeholder")]
        check_job_command(["python", "-m", "jobs.embed", "--config", str(config), *placeholders], doc.where, capsys)
