"""``dtlray data prepare`` / ``dtlray data list`` through ``dtlray.cli.main``."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dtlray.cli import main
from dtlray.data import load_info
from dtlray.errors import DtlrayError
from tests.conftest import one_error_line


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail as a user error: exit 2, one line on stderr, no traceback."""
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    err = one_error_line(err)
    assert "Traceback" not in err
    return err


def image_folder(base: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 8) -> Path:
    folder = base / "imgs"
    for index, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for number in range(per_class):
            mode, extension = [("L", "png"), ("RGB", "jpg"), ("RGBA", "png")][number % 3]
            color = (40 * index, 200, 30, 255)[: len(mode)]
            Image.new(mode, (12, 9), color).save(folder / name / f"{number}.{extension}")
    return folder


def test_prepare_digits_then_reuse_then_conflict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(tmp_path)
    code, out, _ = run(["data", "prepare", "digits", "--root", root], capsys)
    assert code == 0
    assert out.startswith("prepared digits: 1,797 rows (train 1,257, val 270, test 270)")
    code, out, _ = run(["data", "prepare", "digits", "--root", root], capsys)
    assert code == 0 and out.startswith("reusing digits: 1,797 rows")
    err = fail(["data", "prepare", "digits", "--root", root, "--seed", "2"], capsys)
    assert "other arguments" in err and "seed=0" in err and "seed=2" in err and "--force" in err
    code, out, _ = run(
        ["data", "prepare", "digits", "--root", root, "--seed", "2", "--force"], capsys
    )
    assert code == 0 and out.startswith("prepared digits")
    assert load_info("digits", tmp_path).provenance.seed == 2


def test_prepare_full_fashion_mnist_and_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(tmp_path)
    code, out, _ = run(["data", "prepare", "fashion-mnist", "--root", root], capsys)
    assert code == 0
    assert "fashion-mnist: 70,000 rows (train 54,000, val 6,000, test 10,000), 10 classes" in out
    assert run(["data", "prepare", "faces", "--root", root], capsys)[0] == 0
    code, out, _ = run(["data", "list", "--root", root], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"datasets in {root}:"
    assert lines[1].split() == ["NAME", "CLASSES", "SHAPE", "FORMAT", "TRAIN", "VAL", "TEST"]
    assert lines[2].split()[:3] == ["faces", "2:", "face,"]
    assert lines[2].split()[-5:] == ["25x25x1", "raw", "140", "30", "30"]
    assert lines[3].startswith("fashion-mnist  10: T-shirt/top, Trouser")
    assert lines[3].split()[-5:] == ["28x28x1", "raw", "54,000", "6,000", "10,000"]
    assert "..." in lines[3]
    # aligned: text columns start under their header, number columns end under theirs
    classes, shape = lines[1].index("CLASSES"), lines[1].index("SHAPE")
    for line in lines[2:]:
        assert line[classes - 2 : classes] == "  " and line[classes] != " "
        assert line[shape:].split()[0].count("x") == 2
    assert len({len(line) for line in lines[1:]}) == 1


def test_download_is_not_needed_when_installed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data", "prepare", "fashion-mnist", "--download", "--limit", "30"]
    code, out, _ = run([*argv, "--root", str(tmp_path)], capsys)
    assert code == 0 and "from Fashion-MNIST IDX files in /usr/share/datasets/fashion-mnist" in out
    assert not (tmp_path / ".downloads").exists()


def test_list_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["data", "list", "--root", str(tmp_path / "none")], capsys)
    assert code == 0 and "no datasets in" in out and "dtlray data prepare NAME" in out


def test_list_uses_dtlray_data(
    data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DTLRAY_DATA", str(data_root))
    code, out, _ = run(["data", "list"], capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[2:]] == [
        "digits",
        "faces",
        "fashion-mnist",
    ]


def test_prepare_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = image_folder(tmp_path)
    argv = ["data", "prepare", "--image-folder", str(folder), "--name", "mine"]
    argv += ["--root", str(tmp_path / "root"), "--image-size", "16", "--channels", "1"]
    code, out, _ = run(argv, capsys)
    assert code == 0 and out.startswith("prepared mine: 16 rows") and "16x16x1" in out
    info = load_info("mine", tmp_path / "root")
    assert info.classes == ("a", "b") and info.image_shape == (16, 16, 1)


def test_skip_bad_reports_how_many(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = image_folder(tmp_path)
    (folder / "a" / "bad.png").write_bytes(b"not an image")
    argv = ["data", "prepare", "--image-folder", str(folder), "--name", "mine"]
    argv += ["--root", str(tmp_path / "root")]
    err = fail(argv, capsys)
    assert f"cannot read image {folder / 'a' / 'bad.png'}" in err and "--skip-bad" in err
    assert list((tmp_path / "root").iterdir()) == []
    code, out, _ = run([*argv, "--skip-bad"], capsys)
    assert code == 0 and "1 unreadable skipped" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["mnist"],
            "unknown dataset 'mnist': the built-in datasets are fashion-mnist, digits, faces",
        ),
        ([], "name a built-in dataset (fashion-mnist, digits, faces), or pass --image-folder"),
        (["digits", "--name", "x"], "--name apply only with --image-folder"),
        (["digits", "--image-size", "64"], "--image-size apply only with --image-folder"),
        (["digits", "--from", "/tmp"], "--from and --download apply only to fashion-mnist"),
        (["--image-folder", "/tmp"], "--image-folder needs a dataset name: add --name NAME"),
        (["digits", "--limit", "0"], "--limit must be a positive number"),
        (["digits", "--seed", "-1"], "--seed must be a non-negative integer"),
    ],
)
def test_prepare_argument_errors(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fail(["data", "prepare", *argv, "--root", str(tmp_path)], capsys)
    assert expected in err
    assert list(tmp_path.iterdir()) == []


def test_fashion_mnist_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "prepare", "fashion-mnist", "--from", str(tmp_path / "nothing")]
    err = fail([*argv, "--root", str(tmp_path / "root")], capsys)
    assert "Fashion-MNIST files not found in" in err
    assert "apt-get install dataset-fashion-mnist" in err and "--from DIR" in err
    assert "--download" in err


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "does not exist or is not a directory"),
        ("empty", "needs at least two class sub-folders (found none)"),
        ("one-class", "needs at least two class sub-folders (found 'a')"),
        ("name-sep", "invalid dataset name 'a/b'"),
        ("name-dots", "invalid dataset name '..'"),
        ("name-hidden", "invalid dataset name '.x'"),
        ("name-empty", "invalid dataset name ''"),
        ("size-small", "--image-size must be an integer from 8 to 512, got 7"),
        ("size-large", "--image-size must be an integer from 8 to 512, got 1024"),
        ("channels", "--channels must be 1 (grey) or 3 (RGB), got 2"),
        ("limit", "--limit apply only to built-in datasets"),
    ],
)
def test_image_folder_errors(
    case: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    name, extra = "x", []
    if case == "empty":
        folder.mkdir()
    elif case == "one-class":
        folder = image_folder(tmp_path, classes=("a",))
    elif case != "missing":
        folder = image_folder(tmp_path)
    name = {"name-sep": "a/b", "name-dots": "..", "name-hidden": ".x", "name-empty": ""}.get(
        case, name
    )
    extra = {
        "size-small": ["--image-size", "7"],
        "size-large": ["--image-size", "1024"],
        "channels": ["--channels", "2"],
        "limit": ["--limit", "5"],
    }.get(case, extra)
    root = tmp_path / "root"
    argv = ["data", "prepare", "--image-folder", str(folder), "--name", name, "--root", str(root)]
    err = fail([*argv, *extra], capsys)
    assert expected in err
    assert not root.exists() or list(root.iterdir()) == []


def test_unwritable_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = fail(["data", "prepare", "faces", "--root", str(blocker / "data")], capsys)
    assert f"data root {blocker / 'data'} is not writable" in err
    assert "pass --root DIR or set $DTLRAY_DATA" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(DtlrayError, match="unknown dataset"):
        main(["--debug", "data", "prepare", "nope", "--root", str(tmp_path)])
