"""Outputs that cannot be written -- a full disk (ENOSPC), a missing permission (EACCES) -- end in one
line on stderr naming the path, the reason and a fix, with exit status 2 and no traceback, and leave
nothing behind: no partial folder or file, no temporaries, an existing output intact.

Faults are injected where bytes reach the file system, and only for paths under the test's output
root (pytest, caches and inputs write normally):

* ``write``: a file opened for writing gets a few bytes, then the write fails (a disk filling up
  mid-file); the native writer (safetensors, in Rust) does the same and raises its own
  ``SafetensorError("... (os error 28)")``, as the real one does.
* ``create``: folders and files cannot be created at all (a folder without write permission).
* ``rename``: everything is written, but the final ``os.replace`` fails (the last moment a write can
  fail: all temporaries are full and must go).

The last test runs the CLI in a child process under a real file-size limit (``ulimit -f``), so the
libraries' own writers fail for real.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import transformers.modeling_utils
from safetensors import SafetensorError

import graphprune.passes.checkpoint as checkpoint_module
from graphprune import fileio
from graphprune.cli import main
from graphprune.errors import OutputError

ENOSPC, EACCES = errno.ENOSPC, errno.EACCES
_WRITE_MODES = set("wax+")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


class Faults:
    """Make writes under ``root`` fail with ``code`` in ``phase`` (see the module docstring).

    ``only`` narrows the faults to some paths (for a rename: its source); ``hits`` lists the
    paths that failed, so a test can tell that the fault was reached at all.
    """

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, root: Path, code: int, phase: str, only: Callable[[Path], bool] | None = None
    ) -> None:
        assert phase in ("write", "create", "rename")
        self.root = root.absolute()
        self.code = code
        self.phase = phase
        self.only = only
        self.hits: list[Path] = []
        real_open, real_os_open, real_mkdir, real_replace, real_rename = builtins.open, os.open, os.mkdir, os.replace, os.rename

        def guarded(path: object, narrow: bool = True) -> Path | None:
            if not isinstance(path, (str, bytes, os.PathLike)):
                return None  # a file descriptor
            p = Path(os.fsdecode(path)).absolute()
            inside = p == self.root or self.root in p.parents
            return p if inside and (not narrow or self.only is None or self.only(p)) else None

        def error(path: Path, *more: object) -> OSError:
            self.hits.append(path)
            return OSError(self.code, os.strerror(self.code), str(path), *more)

        def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
            path = guarded(file) if _WRITE_MODES & set(str(mode)) else None
            if path is None or self.phase == "rename":
                return real_open(file, mode, *args, **kwargs)
            if self.phase == "write":
                with real_open(file, "wb") as handle:
                    handle.write(b"partial")  # some bytes made it before the disk filled up
            raise error(path)

        def fake_os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
            p = guarded(path) if flags & _WRITE_FLAGS else None
            if p is not None and self.phase == "create":
                raise error(p)  # open(2) either creates the file or fails: nothing is left
            return real_os_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            p = guarded(path)
            if p is not None and self.phase == "create":
                raise error(p)
            return real_mkdir(path, *args, **kwargs)

        def renamer(real: Callable[..., None]) -> Callable[..., None]:
            def fake(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
                p = guarded(src)
                if p is not None and guarded(dst, narrow=False) is not None and self.phase == "rename":
                    raise error(p, None, str(dst))
                return real(src, dst, *args, **kwargs)

            return fake

        def native(real: Callable[..., None]) -> Callable[..., None]:
            def fake(tensors, filename, *args, **kwargs):  # type: ignore[no-untyped-def]
                p = guarded(filename)
                if p is None or self.phase == "rename":
                    return real(tensors, filename, *args, **kwargs)
                if self.phase == "write":
                    with real_open(filename, "wb") as handle:
                        handle.write(b"partial")
                self.hits.append(p)
                raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(self.code)} (os error {self.code})")

            return fake

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)  # what pathlib calls
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        monkeypatch.setattr(os, "rename", renamer(real_rename))
        monkeypatch.setattr(safetensors.torch, "save_file", native(safetensors.torch.save_file))
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", native(transformers.modeling_utils.safe_save_file))
        monkeypatch.setattr(checkpoint_module, "save_file", native(checkpoint_module.save_file))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``, by relative path."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def one_line_failure(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main([*args, "-q"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def check_line(line: str, code: int, target: Path, option: str = "--out") -> None:
    """The line names ``target`` (or a file inside it, or a folder that was to hold it), the
    reason and a fix, and never a temporary name."""
    reason = os.strerror(code)
    match = re.search(rf"cannot write (.+?): {re.escape(reason)}; (.+)$", line)
    assert match, line
    shown = Path(match.group(1))
    assert shown == target or target in shown.parents or shown in target.parents, line
    assert option in match.group(2), line
    assert ".tmp-" not in line and ".old-" not in line and ".part-" not in line, line


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Where the outputs go (faults apply only here); created, so 'nothing new' is measurable."""
    path = tmp_path / "outputs"
    path.mkdir()
    return path


PRUNE = ["prune", "--model", "tiny-llama", "--method", "magnitude", "--sparsity", "0.5", "--calib-samples", "2", "--calib-len", "32"]
FAULTS = [(ENOSPC, "write"), (EACCES, "create"), (EACCES, "rename")]


# ---------------------------------------------------------------------------- prune
@pytest.mark.parametrize("code, phase", FAULTS)
def test_prune_output(code, phase, root, tmp_path, monkeypatch, capsys) -> None:
    out = root / "models" / "tiny"  # "models" does not exist yet: it must not be left behind either
    faults = Faults(monkeypatch, root, code, phase)
    line = one_line_failure([*PRUNE, "--out", str(out), "--checkpoint-dir", str(tmp_path / "ck")], capsys)
    assert faults.hits
    check_line(line, code, out)
    assert snapshot(root) == {}


@pytest.mark.parametrize("code, phase", [(ENOSPC, "write"), (EACCES, "rename")])
def test_prune_overwrite_keeps_the_old_folder(code, phase, root, tmp_path, monkeypatch, capsys) -> None:
    out = root / "tiny"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}\n')
    (out / "model.safetensors").write_bytes(b"old weights")
    before = snapshot(root)
    # rename: only the finished folder's move into place fails, after the old one was moved aside
    only = (lambda p: ".tmp-" in p.name) if phase == "rename" else None
    faults = Faults(monkeypatch, root, code, phase, only=only)
    line = one_line_failure([*PRUNE, "--out", str(out), "--overwrite", "--checkpoint-dir", str(tmp_path / "ck")], capsys)
    assert faults.hits
    check_line(line, code, out)
    assert snapshot(root) == before


@pytest.mark.parametrize("code, phase", FAULTS)
def test_prune_checkpoint(code, phase, root, tmp_path, monkeypatch, capsys) -> None:
    ck = root / "ck" / "job"
    faults = Faults(monkeypatch, root, code, phase)
    line = one_line_failure([*PRUNE, "--out", str(tmp_path / "model"), "--checkpoint-dir", str(ck)], capsys)
    assert faults.hits
    check_line(line, code, ck, option="--checkpoint-dir")
    assert "--resume" not in line  # no stage was finished: nothing to resume, and nothing kept
    assert snapshot(root) == {} and not (tmp_path / "model").exists()


def test_prune_checkpoint_keeps_finished_stages_for_resume(root, tmp_path, monkeypatch, capsys) -> None:
    ck, out = root / "ck", tmp_path / "model"
    with monkeypatch.context() as patch:
        faults = Faults(patch, root, ENOSPC, "write", only=lambda p: "block-0001" in p.name)  # the second block's record
        line = one_line_failure([*PRUNE, "--out", str(out), "--checkpoint-dir", str(ck)], capsys)
        assert faults.hits
    check_line(line, ENOSPC, ck, option="--checkpoint-dir")
    assert "1 finished stage is kept in" in line and "--resume" in line
    (job,) = ck.iterdir()
    assert sorted(p.name for p in job.iterdir()) == ["block-0000.json", "block-0000.safetensors", "manifest.json"]
    assert not out.exists()
    # the kept stage is sound: resuming finishes the job and removes the checkpoint
    assert main([*PRUNE, "--out", str(out), "--checkpoint-dir", str(ck), "--resume", "-q"]) == 0
    assert (out / "config.json").is_file() and not ck.exists()


def test_lazy_prune_shards(root, tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "tiny-folder"
    assert main(["convert", "--model", "tiny-llama", "--out", str(folder), "-q"]) == 0
    capsys.readouterr()
    out = root / "lazy"
    for code, phase in [(ENOSPC, "write"), (EACCES, "rename")]:  # a shard fails / the finished folder cannot be moved
        args = [*PRUNE, "--lazy", "--out", str(out), "--checkpoint-dir", str(tmp_path / f"ck-{phase}")]
        args[args.index("tiny-llama")] = str(folder)
        with monkeypatch.context() as patch:
            faults = Faults(patch, root, code, phase)
            line = one_line_failure(args, capsys)
            assert faults.hits, line
        check_line(line, code, out)
        assert snapshot(root) == {}


# ---------------------------------------------------------------------------- export, bench, convert
@pytest.mark.parametrize(
    "fmt, code, phase, existing",
    [
        ("onnx", ENOSPC, "write", False),
        ("onnx", EACCES, "rename", True),
        ("torchscript", ENOSPC, "write", True),
        ("torchscript", EACCES, "create", False),
    ],
)
def test_export(fmt, code, phase, existing, root, monkeypatch, capsys) -> None:
    out = root / "exports" / ("model.onnx" if fmt == "onnx" else "model.pt")
    if existing:
        out.parent.mkdir()
        out.write_bytes(b"previous export")
    before = snapshot(root)
    faults = Faults(monkeypatch, root, code, phase)
    args = ["export", "tiny-llama", "--format", fmt, "--out", str(out)] + (["--overwrite"] if existing else [])
    line = one_line_failure(args, capsys)
    assert faults.hits
    check_line(line, code, out)
    assert snapshot(root) == before


@pytest.mark.parametrize("code, phase", FAULTS)
def test_bench(code, phase, root, monkeypatch, capsys) -> None:
    out = root / "bench" / "run"
    faults = Faults(monkeypatch, root, code, phase)
    args = ["bench", "tiny-llama", "--runtimes", "eager", "--cases", "c=1x4", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    line = one_line_failure(args, capsys)
    assert faults.hits
    check_line(line, code, out)
    assert snapshot(root) == {}


def test_bench_files_land_all_or_none(root, monkeypatch, capsys) -> None:
    """Only the plot's write fails: the table and the JSON, already written, must not be left
    alone in the folder (a report without its plot, or a plot from an older run beside them)."""
    out = root / "bench" / "run"
    faults = Faults(monkeypatch, root, ENOSPC, "write", only=lambda p: "png" in p.name)
    args = ["bench", "tiny-llama", "--runtimes", "eager", "--cases", "c=1x4", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    line = one_line_failure(args, capsys)
    assert faults.hits and all("png" in p.name for p in faults.hits)
    check_line(line, ENOSPC, out)
    assert snapshot(root) == {}


@pytest.mark.parametrize("code, phase, existing", [(ENOSPC, "write", False), (EACCES, "create", False), (EACCES, "rename", True)])
def test_convert(code, phase, existing, root, monkeypatch, capsys) -> None:
    out = root / "converted"
    if existing:
        out.mkdir()
        (out / "config.json").write_text("{}\n")
    before = snapshot(root)
    faults = Faults(monkeypatch, root, code, phase)
    line = one_line_failure(["convert", "--model", "tiny-llama", "--out", str(out)] + (["--overwrite"] if existing else []), capsys)
    assert faults.hits
    check_line(line, code, out)
    assert snapshot(root) == before


# ---------------------------------------------------------------------------- a real limit, in a child process
@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX resource limits")
@pytest.mark.parametrize("command", ["convert", "torchscript"])
def test_real_file_size_limit(command, root) -> None:
    """Under ``ulimit -f`` the libraries' own writers fail for real (safetensors in Rust, TorchScript,
    which used to abort the interpreter from C++); still one line, nothing left behind."""
    import resource

    limit = 32 * 1024  # the tiny model's weights are larger; its config and the report are not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = root / ("converted" if command == "convert" else "model.pt")
    args = (
        ["convert", "--model", "tiny-llama", "--out", str(out)]
        if command == "convert"
        else ["export", "tiny-llama", "--format", "torchscript", "--out", str(out)]
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # the limit is for the outputs, not for .pyc files
    proc = subprocess.run(
        [sys.executable, "-m", "graphprune", *args, "-q"], capture_output=True, text=True, timeout=300, env=env, preexec_fn=limited
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    check_line(lines[0], errno.EFBIG, out)
    assert snapshot(root) == {}


# ---------------------------------------------------------------------------- graphprune.fileio on its own
def test_atomic_path_cleans_up_after_keyboard_interrupt(tmp_path) -> None:
    target = tmp_path / "new" / "deeper" / "data.bin"
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".data.bin.tmp-")
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # neither the temporary nor the folders made for it
    fileio.write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in target.parent.iterdir()] == ["data.bin"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # like any file the user writes, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_replace_keeps_the_old_file_and_names_the_target(tmp_path, monkeypatch) -> None:
    target = tmp_path / "report.json"
    target.write_text("old\n")
    Faults(monkeypatch, tmp_path, ENOSPC, "rename")
    with pytest.raises(OutputError) as info:
        fileio.write_json(target, {"new": 1})
    assert str(info.value) == f"cannot write {target}: No space left on device; free space or choose another --out."
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"] and target.read_text() == "old\n"


def test_atomic_dir_restores_the_old_folder(tmp_path, monkeypatch) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists; choose another --out or pass --overwrite"):
        with fileio.atomic_dir(out):
            pass
    with monkeypatch.context() as patch:
        faults = Faults(patch, tmp_path, EACCES, "rename", only=lambda p: ".tmp-" in p.name)
        with pytest.raises(OutputError, match=f"cannot write {re.escape(str(out))}: Permission denied"):
            with fileio.atomic_dir(out, overwrite=True) as staging:
                (staging / "weights").write_bytes(b"new")
        assert faults.hits  # the old folder had been moved aside when the new one failed to move in
    assert snapshot(tmp_path) == {"model": None, "model/weights": b"old"}
    with fileio.atomic_dir(out, overwrite=True) as staging:
        (staging / "weights").write_bytes(b"new")
    assert snapshot(tmp_path) == {"model": None, "model/weights": b"new"}


def test_publish_is_all_or_none(tmp_path, monkeypatch) -> None:
    (tmp_path / "m.onnx").write_bytes(b"old model")
    (tmp_path / "m.onnx.data").write_bytes(b"old data")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=f"cannot write {re.escape(str(tmp_path / 'm.onnx'))}: No space left"):
        with fileio.staging_dir(tmp_path / "m.onnx") as stage:
            (stage / "m.onnx.data").write_bytes(b"new data")
            (stage / "m.onnx").write_bytes(b"new model")
            with monkeypatch.context() as patch:  # the data file moves in, the model file does not
                Faults(patch, tmp_path, ENOSPC, "rename", only=lambda p: p.name == "m.onnx")
                fileio.publish([stage / "m.onnx.data", stage / "m.onnx"], tmp_path)
    assert snapshot(tmp_path) == before  # the new data file was rolled back, no backups are left


def test_native_writer_errors_are_recognised(tmp_path) -> None:
    exc = SafetensorError(f"Error while serializing: I/O error: {os.strerror(ENOSPC)} (os error {ENOSPC})")
    err = fileio.output_error(exc, tmp_path / "out", option="--checkpoint-dir")
    assert err is not None and str(err) == f"cannot write {tmp_path / 'out'}: No space left on device; " + (
        "free space or choose another --checkpoint-dir."
    )
    assert fileio.output_error(ValueError("bad value"), tmp_path) is None
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "x")
    assert fileio.output_error(missing, tmp_path) is None  # not an output problem: left alone (a bug shows its traceback)


def test_a_write_nested_in_a_staged_folder_is_named_by_its_final_path(tmp_path, monkeypatch) -> None:
    """A recipe writes its bench report atomically inside the staged model folder: a failure there
    names the file in the final folder, not in the staging one."""
    out = tmp_path / "model"
    with monkeypatch.context() as patch:
        Faults(patch, tmp_path, ENOSPC, "write", only=lambda p: "latency" in p.name)
        with pytest.raises(OutputError) as info:
            with fileio.atomic_dir(out) as staging:
                fileio.write_bytes(staging / "config.json", b"{}")
                fileio.write_bytes(staging / "bench" / "latency.md", b"| table |")
    shown = out / "bench" / "latency.md"
    assert str(info.value) == f"cannot write {shown}: No space left on device; free space or choose another --out."
    assert info.value.path == shown and isinstance(info.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_reports_a_full_disk_from_any_writer_but_not_a_read(monkeypatch, tmp_path, capsys) -> None:
    """A full disk met outside graphprune's writers is still one line; a permission error may be a
    read (an unreadable model folder), so it is not dressed up as a write failure."""
    import graphprune.cli as cli

    def inspect_fails(args):  # type: ignore[no-untyped-def]
        raise raised

    monkeypatch.setitem(cli.COMMANDS, "inspect", inspect_fails)
    raised: Exception = SafetensorError(f"Error while serializing: I/O error: No space left on device (os error {ENOSPC})")
    line = one_line_failure(["inspect"], capsys)
    assert line == "graphprune inspect: error: cannot write the output: No space left on device; free space or choose another --out."
    raised = PermissionError(EACCES, os.strerror(EACCES), str(tmp_path / "model" / "config.json"))
    with pytest.raises(PermissionError):
        main(["inspect", "-q"])
