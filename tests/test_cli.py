"""The command line: --help explains every flag (the launcher's too), and bad values stop with exit code 2 and a
message naming the flag in a fraction of a second, before torch or any model file is loaded."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from engine.cli import GROUPS, RunConfig, build_parser
from presets import strip_json_comments
from tests.conftest import reference_file
from tests.multirank import ROOT, gang_env

HELP = build_parser().format_help()


def launcher_flags() -> list[str]:
    """The flags launch.sh's own case statement takes (first spelling of each)."""
    text = (ROOT / "launch.sh").read_text()
    block = text.split("while [[ $# -gt 0 ]]; do", 1)[1].split("done", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\s*(--[a-z_-]+)[|)=*]", block, re.M)]


def test_every_flag_has_a_help_line_with_its_default():
    parser = build_parser()
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    assert {a.dest for a in shown} == {f.name for f in fields(RunConfig)} - {"cli_keys"}
    for action in shown:
        assert action.help and not action.help.strip().startswith("(default"), action.option_strings
        assert "(default: " in action.help and "(default: None)" not in action.help, action.option_strings
    grouped = [name for _, _, names in GROUPS for name in names]
    assert sorted(grouped) == sorted(a.dest for a in shown)  # each flag in exactly one group
    for title, _, _ in GROUPS:
        assert f"\n{title}:\n" in HELP


def test_help_says_how_to_run_it_and_lists_the_launchers_flags():
    assert HELP.startswith("usage: ./launch.sh [launcher flags] [app flags]")
    flags = launcher_flags()
    assert {"--no-venv", "--nproc", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--rdzv_endpoint",
            "--max_restarts"} <= set(flags)
    for flag in flags:
        assert re.search(rf"^  {re.escape(flag)} ", HELP, re.M), flag
    assert re.search(r"^  test \[PYTEST ARGS\] ", HELP, re.M) and "apt-get install chromium" in HELP


def test_launch_sh_help_prints_the_same_without_setting_up_a_venv(tmp_path):
    env = {**gang_env(), "WAN_VENV": str(tmp_path / "no-venv"), "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "launch.sh"), "--nproc", "2", "--help"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ./launch.sh [launcher flags] [app flags]")
    assert "--nproc N" in proc.stdout and "--frame_num N" in proc.stdout
    assert not (tmp_path / "no-venv").exists()


def test_every_setting_the_guide_names_is_a_flag():
    guide = reference_file("seed/8gpu_distributed_inference_guide.md").read_text()
    block = strip_json_comments(guide.split("```json", 1)[1].split("```", 1)[0])
    keys = set(re.findall(r'"(\w+)":', block)) | set(re.findall(r'^"(\w+)":', guide, re.M))
    keys |= set(re.findall(r"--(\w+)", guide))
    assert {"world_size", "use_fsdp", "ulysses_size", "offload_percent", "blocks_to_swap", "cache_device",
            "listen", "port"} <= keys
    for key in keys - {"rank"}:  # rank: torchrun's, one per process
        assert re.search(rf"--{key}\b", HELP), key


def run_flags(args: list[str], tmp_path: Path, check_only: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """app.main(args) in a fresh interpreter whose tiny-model folder does not exist; prints whether torch got
    imported. check_only: stop after the checks, as launch.sh does before torchrun."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import app; rc = app.main(sys.argv[2:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    env = {**gang_env(tmp_path / "tiny"), **({"WAN_CHECK_FLAGS": "1"} if check_only else {})}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - t0


BAD_FLAGS = [
    (["--frame_num", "80"], "--frame_num: must be 4n+1 between 1 and 241 (e.g. 17, 33, 81), got 80"),
    (["--prompt", "x", "--frame_num", "80"], "--frame_num: must be 4n+1 between 1 and 241 (e.g. 17, 33, 81), got 80"),
    (["--size", "100*100"], "--size: must be W*H with W and H multiples of 16 between 16 and 1920 (14B: 1280*720, "
                            "720*1280, 832*480, 480*832; 1.3B: 832*480, 480*832; the tiny model: any), got '100*100'"),
    (["--sample_steps", "0"], "--sample_steps: must be between 1 and 200, got 0"),
    (["--sample_shift", "0"], "--sample_shift: must be greater than 0 and at most 20, got 0.0"),
    (["--sample_guide_scale", "21"], "--sample_guide_scale: must be between 0 and 20, got 21.0"),
    (["--base_seed", "-2"], "--base_seed: must be between -1 and 4294967295, got -2"),
    (["--batch_size", "9"], "--batch_size: must be between 1 and 8, got 9"),
    (["--teacache", "-1"], "--teacache: must be between 0 and 10, got -1.0"),
    (["--offload_percent", "1.5"], "--offload_percent: must be between 0 and 1, got 1.5"),
    (["--blocks_to_swap", "-1"], "--blocks_to_swap: must be an integer at least 0, got -1"),
    (["--ulysses_size", "0"], "--ulysses_size: must be between 1 and 1024, got 0"),
    (["--cfg_size", "3"], "--cfg_size: must be between 1 and 2, got 3"),
    (["--world_size", "0"], "--world_size: must be an integer at least 1, got 0"),
    (["--port", "70000"], "--port: must be between 0 and 65535, got 70000"),
    (["--heartbeat_timeout", "0"], "--heartbeat_timeout: must be a number greater than 0, got 0.0"),
    (["--log_level", "loud"], "--log_level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'"),
    (["--prompt", " "], "--prompt: must not be empty"),
    (["--sample_timesteps", "1000,750", "--sample_solver", "unipc", "--prompt", "x"],
     "--sample_solver: explicit sample_timesteps use the distilled Euler update; set sample_solver to euler, got "
     "'unipc'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_FLAGS, ids=[a[0][-2] for a in BAD_FLAGS])
def test_bad_flag_exits_2_naming_it_before_anything_is_loaded(args, message, tmp_path):
    proc, seconds = run_flags(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == f"app.py: error: {message}"
    assert proc.stderr.startswith("usage: ./launch.sh")
    assert proc.stdout.strip() == "no torch"
    assert seconds < 10  # ~0.1 s; generous for a loaded CI machine
    assert list(tmp_path.iterdir()) == []  # no tiny model generated, no outputs folder


def test_a_presets_values_are_checked_too(tmp_path):
    (tmp_path / "p.json").write_text('{"frame_num": 80, // a comment\n "blocks_to_swap": 10}')
    proc, _ = run_flags(["--preset", str(tmp_path / "p.json")], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("app.py: error: --frame_num: must be 4n+1")
    proc, _ = run_flags(["--preset", str(tmp_path / "p.json"), "--frame_num", "17"], tmp_path, check_only=True)
    assert proc.returncode == 0, proc.stderr  # the flag wins over the preset


def test_good_flags_pass_the_check_without_loading_anything(tmp_path):
    proc, _ = run_flags(["--prompt", "a fox", "--size", "64*64", "--frame_num", "5", "--sample_steps", "4",
                         "--preset", "distilled_4step", "--offload_percent", "0.5", "--blocks_to_swap", "99",
                         "--cache_device", "offload_device", "--listen", "--port", "0"], tmp_path, check_only=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no torch"
    assert list(tmp_path.iterdir()) == []


def test_launcher_reports_a_bad_flag_once_before_torchrun(tmp_path):
    env = {**gang_env(tmp_path / "tiny"), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.monotonic()
    proc = subprocess.run([str(ROOT / "launch.sh"), "--no-venv", "--nproc", "2", "--frame_num", "80"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("app.py: error: --frame_num: must be 4n+1") == 1
    assert "starting" not in proc.stderr and time.monotonic() - t0 < 10


def test_launch_test_says_what_is_missing_without_chromium(tmp_path):
    env = {**gang_env(), "WAN_VENV": sys.prefix, "LAUNCH_CHROMIUM": str(tmp_path / "no-chromium")}
    proc = subprocess.run([str(ROOT / "launch.sh"), "test", "tests/test_browser.py"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert f"need Chromium at {tmp_path / 'no-chromium'}, which is missing" in proc.stderr
    assert "apt-get install -y chromium" in proc.stderr and "--ignore=tests/test_browser.py" in proc.stderr
