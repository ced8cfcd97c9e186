"""The settings in sections: the flags sort into them losslessly, the Python API checks them as the
command line does, and the library below the commands never takes the whole configuration."""

import ast
import dataclasses

import pytest
from conftest import REPO

import ddpm_hf
from ddpm_hf.commands.train_cli import main as train_main
from ddpm_hf.config.options import FIELDS, DDPMConfig
from ddpm_hf.config.sections import FLAG_OF, DataSettings, Sections, TrainingSettings, validate
from ddpm_hf.util.errors import UsageError

LIBRARY = REPO / "ddpm_hf"
# Where the whole configuration may be taken: the flags themselves and the commands that read them.
WHOLE_CONFIGURATION_ALLOWED = ("config", "commands")


def test_every_flag_belongs_to_exactly_one_section_with_its_default():
    owners = {}
    for section in dataclasses.fields(Sections):
        for f in dataclasses.fields(section.default_factory):
            owners.setdefault(FLAG_OF.get(f.name, f.name), []).append(section.name)
    assert sorted(owners) == sorted(FIELDS)
    assert {flag: names for flag, names in owners.items() if len(names) > 1} == {}
    assert Sections().flat() == DDPMConfig().to_dict()  # the defaults are the flags' own


def test_sections_round_trip_the_flags_and_rename_eta_and_weight_decay():
    cfg = DDPMConfig(dataset="mnist5k", ddpm=0.3, decay=0.01, size=16, score="hidden", hub_model_id="me/x")
    sections = Sections.of(cfg)
    assert sections.sampling.eta == 0.3 and sections.training.weight_decay == 0.01
    assert sections.data == DataSettings(dataset="mnist5k", size=16)
    assert sections.ood.score == "hidden" and sections.hub.hub_model_id == "me/x"
    assert sections.flat() == cfg.to_dict()


def test_a_section_checks_itself_with_the_flags_line():
    with pytest.raises(UsageError, match=r"^--lr must be > 0, --ema_rate in \[0, 1\) and --decay >= 0$"):
        TrainingSettings(weight_decay=-1.0).validate()
    with pytest.raises(UsageError, match="^--shuffle_buffer_size must be a positive integer, got 0$"):
        DataSettings(shuffle_buffer_size=0).validate()
    with pytest.raises(UsageError, match="^--sample_timesteps 400 is larger than --timesteps 300"):
        validate(DDPMConfig(timesteps=300, sample_timesteps=400))
    assert validate(DDPMConfig(timesteps=300, sample_timesteps=400), timesteps_known=False).sampling.eta == 1.0


def test_the_python_api_refuses_a_bad_value_with_the_commands_line(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--dataset", "mnist5k", "--lr", "-1", "--output_dir", str(out)])
    script_line = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and script_line.endswith("--lr must be > 0, --ema_rate in [0, 1) and --decay >= 0")
    with pytest.raises(UsageError) as err:
        ddpm_hf.train(DDPMConfig(dataset="mnist5k", lr=-1, output_dir=str(out)))
    assert script_line.endswith(str(err.value)) and err.value.exit_code == 2
    assert not out.exists()  # refused before anything was written


def _library_modules():
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(LIBRARY).parts
        if len(parts) > 1 and parts[0] not in WHOLE_CONFIGURATION_ALLOWED:
            yield path


def whole_configuration_takers(source: str) -> list:
    """Functions of `source` with a parameter that is the whole configuration: named `cfg`, or annotated
    DDPMConfig or Sections; and imports of DDPMConfig or Sections."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                annotation = ast.unparse(arg.annotation) if arg and arg.annotation else ""
                if arg and (arg.arg == "cfg" or any(n in annotation for n in ("DDPMConfig", "Sections"))):
                    found.append(f"{node.name}({arg.arg})")
        if isinstance(node, ast.ImportFrom) and any(a.name in ("DDPMConfig", "Sections") for a in node.names):
            found.append(f"import from {node.module}")
    return found


def test_the_signature_scan_sees_a_function_that_takes_the_configuration():
    assert whole_configuration_takers("def f(cfg): pass\ndef g(x: 'DDPMConfig'): pass\n") == ["f(cfg)", "g(x)"]
    assert whole_configuration_takers("from ..config.options import DDPMConfig\n") == ["import from config.options"]
    assert whole_configuration_takers("def f(data: DataSettings, *, seed: int): pass\n") == []


def test_no_library_function_below_the_commands_takes_the_whole_configuration():
    offenders = {
        str(path.relative_to(REPO)): found
        for path in _library_modules()
        if (found := whole_configuration_takers(path.read_text()))
    }
    assert offenders == {}


def test_sampling_and_ood_from_python_are_checked_as_their_commands(tmp_path):
    for run in (ddpm_hf.run_sampling, ddpm_hf.run_ood):
        with pytest.raises(UsageError, match=r"^--ddpm \(the DDIM eta\) must be >= 0, got -1.0$"):
            run(DDPMConfig(checkpoint=str(tmp_path / "missing"), ddpm=-1.0, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
