"""`ddpm-hf COMMAND` (ddpm_hf/commands/cli.py) and the names the commands' usage lines show."""

import subprocess
import sys

import pytest
from conftest import REPO

from ddpm_hf.commands import cli, sample_cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ddpm_hf", *args], capture_output=True, text=True, cwd=REPO)


def test_help_lists_each_command_on_one_line():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("usage: python -m ddpm_hf COMMAND")
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == ["train", "sample", "fid", "ood", "nll", "inpaint", "push", "convert"]


def test_unknown_command_is_one_line_and_exit_2():
    proc = run_cli("trian", "--dataset", "mnist")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: unknown command 'trian'; choose one of train, sample, fid, ood, nll, inpaint, push, convert "
        "(see python -m ddpm_hf --help)"
    ]


def test_no_command_shows_the_list_and_exits_2():
    proc = run_cli()
    assert proc.returncode == 2 and "commands:" in proc.stderr


@pytest.mark.parametrize(
    "command, own, foreign",
    [
        ("train", "--n_epochs", "--out_dataset"),
        ("sample", "--scheduler", "--n_epochs"),
        ("fid", "--fid_reference", "--mask"),
        ("nll", "--nll_timesteps", "--fid_reference"),
        ("inpaint", "--jump_length", "--nll_timesteps"),
        ("ood", "--out_dataset", "--scheduler"),
        ("push", "--card_only", "--n_epochs"),
    ],
)
def test_each_command_help_lists_its_own_flags(command, own, foreign, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"], prog="ddpm-hf")
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert text.startswith(f"usage: ddpm-hf {command} ")
    assert own in text and foreign not in text
    assert "train_ddpm.py" not in text and "sample_ddpm.py" not in text and "ood_ddpm.py" not in text


def test_modes_are_not_flags_of_their_own_command(capsys):
    """`ddpm-hf fid` is sample's --fid run: the switch is set, not offered."""
    from ddpm_hf.config.parsing import parse_config

    for mode in ("fid", "nll", "inpaint"):
        parser = sample_cli.build("ddpm-hf " + mode, mode)
        assert f"--{mode}" not in parser._option_string_actions
        cfg, _ = parse_config(parser, ["--checkpoint", "x"])
        assert getattr(cfg, mode) and sum(bool(getattr(cfg, m)) for m in ("fid", "nll", "inpaint")) == 1


def test_a_bad_flag_of_a_command_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nll", "--no_such_flag"], prog="ddpm-hf")
    assert exit_.value.code == 2
    assert "ddpm-hf nll" in capsys.readouterr().err


def test_console_script_names(monkeypatch, capsys):
    """Run as the console script ddpm-hf-train (sys.argv[0]), the usage line and examples say so."""
    from ddpm_hf.commands import train_cli

    monkeypatch.setattr(sys, "argv", ["/venv/bin/ddpm-hf-train", "--help"])
    with pytest.raises(SystemExit):
        train_cli.main()
    text = capsys.readouterr().out
    assert text.startswith("usage: ddpm-hf-train [--config FILE]")
    assert "  ddpm-hf-train --config configs/quickstart.yaml" in text and "train_ddpm.py" not in text
    assert "accelerate launch -m ddpm_hf train" in text  # an installed package has no script file to launch
