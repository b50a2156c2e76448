"""pip install: pyproject's ranges agree with the pins, and a built wheel installs and runs outside the checkout."""

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from PIL import Image

from pipelines import generate as G
from pipelines.latent_file import load_latent
from tests.factory.models import write_all_models
from utils.toml_file import read_toml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("frame_pack", "pipelines", "hunyuan_model", "networks", "dataset", "training", "utils")
COMMANDS = {
    "fpack-generate-video": "fpack_generate_video.py",
    "fpack-cache-latents": "fpack_cache_latents.py",
    "fpack-cache-text-encoder-outputs": "fpack_cache_text_encoder_outputs.py",
    "fpack-train-network": "fpack_train_network.py",
    "fpack-convert-lora": "convert_lora.py",
}
BUILD_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache", ".ruff_cache",
    "demo_models", "demo_output",
)  # fmt: skip


def pyproject() -> dict:
    return read_toml(os.path.join(ROOT, "pyproject.toml"))


def pins(name: str) -> dict[str, str]:
    """name -> pinned version of a requirements file (its own lines; `-r` includes are read where they are)."""
    result = {}
    with open(os.path.join(ROOT, name)) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                req = Requirement(line)
                result[req.name.lower().replace("_", "-")] = str(next(iter(req.specifier)).version)
    return result


def ranges(requirements: list[str]) -> dict[str, Requirement]:
    return {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in requirements}


@pytest.mark.parametrize("pinned, declared", [("requirements.txt", None), ("requirements-dev.txt", "extras")])
def test_every_pin_lies_in_its_pyproject_range(pinned, declared):
    project = pyproject()["project"]
    if declared is None:
        allowed = ranges(project["dependencies"])
    else:  # a test dependency may also be one of the extras (tensorboard, wandb, ...)
        allowed = ranges([r for extra in project["optional-dependencies"].values() for r in extra])
    versions = pins(pinned)
    if declared == "extras":
        versions.pop("setuptools")  # the build backend, declared in [build-system]
        assert pyproject()["build-system"]["requires"] == ["setuptools>=77"]
    missing = sorted(set(versions) - set(allowed))
    assert not missing, f"{pinned} pins {missing}, which pyproject.toml does not declare (add a range there)"
    outside = {name: v for name, v in versions.items() if not allowed[name].specifier.contains(v, prereleases=True)}
    assert not outside, f"pins outside pyproject.toml's ranges: {outside}"


def test_console_scripts_are_the_top_level_scripts():
    config = pyproject()
    scripts = config["project"]["scripts"]
    assert scripts == {name: f"{os.path.splitext(script)[0]}:main" for name, script in COMMANDS.items()}
    assert sorted(config["tool"]["setuptools"]["py-modules"]) == sorted(s[:-3] for s in COMMANDS.values())
    for script in COMMANDS.values():
        with open(os.path.join(ROOT, script)) as f:
            assert 'if __name__ == "__main__":\n    sys.exit(main())' in f.read(), script


# ---- the wheel ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from a copy of the checkout (a build writes build/ and *.egg-info beside the
    sources) without build isolation, so it needs no network."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=BUILD_IGNORE)
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(root / "dist"), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = (root / "dist").glob("*.whl")
    return path


def test_wheel_holds_every_package_module_and_no_tests(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == set(PACKAGES) | {s for s in COMMANDS.values()}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    assert os.path.relpath(os.path.join(folder, file), ROOT) in names


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh venv with only the wheel installed (--no-deps); the test venv's site-packages is visible through a
    .pth file, so the dependencies need not be installed again."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with open(os.path.join(site, "test_venv_packages.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


def outside_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_installed_packages_come_from_the_venv(installed, tmp_path):
    code = "import pipelines, frame_pack, fpack_generate_video; print(pipelines.__file__, frame_pack.__file__)"
    result = subprocess.run(
        [installed / "bin" / "python", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=outside_env()
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(path.startswith(str(installed)) for path in result.stdout.split())
    probe = subprocess.run([installed / "bin" / "python", "-c", "import tests"], capture_output=True, cwd=tmp_path)
    assert probe.returncode != 0  # tests and tests/factory are not installed


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_console_script_help_is_the_checkout_scripts_help(installed, tmp_path, command, monkeypatch, capsys):
    env = {**outside_env(), "COLUMNS": "120"}
    result = subprocess.run(
        [installed / "bin" / command, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit):
        importlib.import_module(COMMANDS[command][:-3]).main(["--help"])
    expected = capsys.readouterr().out
    assert result.stdout.startswith("usage: ") and "--help" in expected
    # the same text after the usage lines (argparse names the program after argv[0] where a parser sets no prog)
    assert result.stdout.split("\n\n", 1)[1] == expected.split("\n\n", 1)[1]


@pytest.mark.slow
def test_installed_generation_outside_the_checkout_matches_the_checkout(installed, tmp_path):
    models = write_all_models(tmp_path / "models")
    image = tmp_path / "start.png"
    Image.fromarray(np.full((32, 48, 3), (180, 60, 30), np.uint8)).save(image)
    flags = [*models.flags(), "--image_path", str(image), "--prompt", "a red square", "--video_size", "32", "48",
             "--latent_window_size", "3", "--video_sections", "1", "--infer_steps", "2", "--seed", "7",
             "--output_type", "latent"]  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [installed / "bin" / "fpack-generate-video", *flags, "--save_path", "out"],
        capture_output=True, text=True, cwd=work, env=outside_env(), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (installed_latent,) = (work / "out").glob("*_latent.safetensors")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the installed run, so every reduction adds in the same order
    try:
        assert G.main([*flags, "--save_path", str(tmp_path / "checkout")]) == 0
    finally:
        torch.set_num_threads(threads)
    (checkout_latent,) = (tmp_path / "checkout").glob("*_latent.safetensors")
    expected, actual = load_latent(str(checkout_latent))[0], load_latent(str(installed_latent))[0]
    assert actual.shape == expected.shape and actual.equal(expected)
