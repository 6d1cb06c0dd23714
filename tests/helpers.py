"""What many test files share (tests/README.md): the checkout's paths, the FAST training
overrides, the one-error-line check, the CLI run in this process or in a child process, the
embedded set's held-out split written as image files, and a folder built once per test session
whichever xdist worker asks first."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from msl_kit.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[1]
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...; None without xdist
SHARED_DATA = REPO.parent / "shared" / "data"  # the team's real archives, beside the checkout

# A finished digits run in about a second: checkpoints at 2, 4 and 6, evaluated at the end only,
# no floors (what --no-baseline also sets), one thread.
FAST = [
    "train.iterations=6",
    "train.checkpoint_every=2",
    "train.eval_every=0",
    "train.threads=1",
    "eval.floors=false",
]

# The released BN-Inception preprocessing written out by hand (not read from msl_kit), for the
# transform tests to compare the kit's pipeline against torchvision's
BNINCEPTION = Preprocessing(
    color="BGR",
    value_range=255.0,
    mean=(104.0, 117.0, 128.0),
    std=(1.0, 1.0, 1.0),
    input_size=227,
    resize_size=256,
    crop_scale=(0.16, 1.0),
    hflip=True,
)


class LazyModule:
    """Module `name`, imported on the first use of one of its public names: for a module that
    is slow to import and used by few tests (every xdist worker imports every test module while
    collecting, and pytest looks at each module-level name then; private names are not
    forwarded, so that look does not import it)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)


def set_args(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """`--set KEY=VALUE` for each override, as an argv list."""
    return [arg for override in overrides for arg in ("--set", override)]


FAST_ARGS = ["--config", "digits", *set_args(FAST)]


def error_line(err: str, start: str = "", only: bool = False) -> str:
    """The CLI's one `error: ...` line in `err` (its stderr), returned: exactly one line holds
    "error:", it begins with `error: {start}` (nothing printed before it on that line), and no
    traceback was printed; with `only`, stderr is that line and nothing else."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {start}"), f"not the expected error line: {lines[0]!r}"
    if only:
        assert err == lines[0] + "\n", f"stderr holds more than the error line: {err!r}"
    return lines[0]


def printed_error(capsys: pytest.CaptureFixture, start: str = "") -> str:
    """The error line `cli.main` printed since capsys was last read, and nothing else on
    stderr: `error_line(err, start, only=True)`."""
    return error_line(capsys.readouterr().err, start, only=True)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """`msl-kit ARGV` in this process: its exit status and, for exit 2, its one error line
    (`error_line`), else what it printed (stdout, then stderr)."""
    from msl_kit import cli

    capsys.readouterr()
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, (error_line(captured.err) if rc == 2 else captured.out + captured.err)


def file_digests(folder: Path) -> dict[str, str]:
    """Each file under `folder` (relative path) with the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def train_quietly(argv: list[str]) -> None:
    """`msl-kit ARGV` in this process, its output swallowed; fails unless it exits 0."""
    out = io.StringIO()
    from msl_kit import cli

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli.main(argv)
    assert rc == 0, out.getvalue()[-3000:]


def start_cli(args: list[str]) -> subprocess.Popen:
    """`msl-kit ARGS` from the checkout in a new session (its own process group, so a test can
    signal the whole group as a terminal would), one thread, output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "msl_kit.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def held_out_tree(base: Path, limit: int | None = None) -> tuple[Path, list[str]]:
    """The test split of the embedded set as base/tree/<alphabet>__<character>/<file>.png
    (bytes as shipped; files already there are kept); returns the tree and, per dataset item
    (the first `limit`), its written path."""
    from msl_kit import datasets
    from msl_kit.datasets import embedded

    tree = base / "tree"
    ds = datasets.build("omniglot_small", None, "test")
    written = []
    archives: dict[str, zipfile.ZipFile] = {}
    for member, label in zip(ds.paths[:limit], ds.labels[:limit]):
        member = str(member)
        name = member.split("/", 1)[0]
        if name not in archives:
            archives[name] = zipfile.ZipFile(embedded.DATA_DIR / f"{name}.zip")
        folder = tree / ds.classes[label].replace("/", "__")
        path = folder / Path(member).name
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archives[name].read(member))
        written.append(str(path.resolve()))
    for zf in archives.values():
        zf.close()
    return tree, written


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a file) for the block; every worker waits its turn."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per test session, whichever worker asks first; the others wait for
    it and get the same folder (under the session's temp folder, beside the workers' own)."""
    base = factory.getbasetemp()
    shared = base.parent if WORKER else base
    folder, done = shared / name, shared / f"{name}.done"
    with _locked(shared / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed halfway
            build(folder)
            done.write_text("built\n")
    return folder


def read_only(folder: Path) -> Iterator[Path]:
    """Yield `folder`; at the end of the session, fail if a test changed a file in it (a test
    that writes copies it first: shutil.copytree(run, tmp_path / "run"))."""
    before = file_digests(folder)
    yield folder
    assert file_digests(folder) == before, f"a test changed the shared {folder}; copy it first"
