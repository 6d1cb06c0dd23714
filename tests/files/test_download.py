"""download_file against a local HTTP server (resume, checksum), and safe_extract against
malicious tar and zip archives."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from fake_data import bomb_tgz, serve, tar_bytes, zip_bytes

from msl_kit.files.archives import (
    ArchiveLimitError,
    DamagedArchiveError,
    UnsafeArchiveError,
    safe_extract,
)
from msl_kit.files.download import ChecksumError, DownloadError, download_file, md5sum

PAYLOAD = os.urandom(3 * 1024 * 1024 + 12345)  # several 1 MiB chunks and a ragged end
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_md5sum_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(PAYLOAD)
    assert md5sum(path) == PAYLOAD_MD5
    (tmp_path / "empty").write_bytes(b"")
    assert md5sum(tmp_path / "empty") == hashlib.md5(b"").hexdigest()


def test_good_download_verifies_and_renames(tmp_path):
    dest = tmp_path / "sub" / "file.bin"
    with serve({"file.bin": PAYLOAD}) as srv:
        assert download_file(srv.url("file.bin"), dest, md5=PAYLOAD_MD5, progress=False) == dest
        assert dest.read_bytes() == PAYLOAD
        assert os.listdir(dest.parent) == ["file.bin"]  # no .part left
        download_file(srv.url("file.bin"), dest, md5=PAYLOAD_MD5.upper(), progress=False)
    assert len(srv.requests) == 1  # a verified file is not fetched again


def test_connection_cut_halfway_resumes_with_range(tmp_path):
    dest = tmp_path / "file.bin"
    with serve({"file.bin": PAYLOAD}, cut={"file.bin": 1}) as srv:
        download_file(srv.url("file.bin"), dest, md5=PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert srv.requests == [("file.bin", None), ("file.bin", f"bytes={len(PAYLOAD) // 2}-")]


def test_cut_without_retries_keeps_part_and_next_call_resumes(tmp_path):
    dest = tmp_path / "file.bin"
    with serve({"file.bin": PAYLOAD}, cut={"file.bin": 1}) as srv:
        with pytest.raises(DownloadError, match="run the same command again to resume"):
            download_file(srv.url("file.bin"), dest, md5=PAYLOAD_MD5, progress=False, retries=0)
        part = tmp_path / "file.bin.part"
        assert not dest.exists() and part.read_bytes() == PAYLOAD[: len(PAYLOAD) // 2]
        download_file(srv.url("file.bin"), dest, md5=PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert srv.requests[-1] == ("file.bin", f"bytes={len(PAYLOAD) // 2}-")


def test_server_ignoring_range_restarts_from_zero(tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(b"stale bytes from elsewhere")
    with serve({"file.bin": PAYLOAD}, ignore_range=True) as srv:
        download_file(srv.url("file.bin"), dest, md5=PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert srv.requests[0][1] == "bytes=26-"  # it asked, got a 200 with the whole file


def test_complete_part_with_416_is_kept(tmp_path):
    dest = tmp_path / "file.bin"
    # killed after the last byte, before the rename
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)
    with serve({"file.bin": PAYLOAD}) as srv:
        download_file(srv.url("file.bin"), dest, md5=PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_wrong_checksum_is_a_clear_error_and_leaves_nothing(tmp_path):
    folder = tmp_path / "downloads"
    with serve({"file.bin": PAYLOAD}) as srv:
        with pytest.raises(ChecksumError, match=f"md5 {PAYLOAD_MD5}, expected 0{{32}}.*deleted"):
            download_file(srv.url("file.bin"), folder / "file.bin", md5="0" * 32, progress=False)
    assert list(folder.iterdir()) == []


def test_stale_file_with_wrong_md5_is_fetched_again(tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"truncated copy")
    with serve({"file.bin": PAYLOAD}) as srv:
        download_file(srv.url("file.bin"), dest, md5=PAYLOAD_MD5, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_missing_file_says_what_to_do(tmp_path):
    with serve({}) as srv:
        with pytest.raises(DownloadError, match="HTTP 404.*--archive"):
            download_file(srv.url("nope.tgz"), tmp_path / "nope.tgz", progress=False)
    assert len(srv.requests) == 1 and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- safe_extract


def _tar(path: Path, entries: list[tuple[str, str, str | bytes]]) -> Path:
    """entries: (kind, name, data-or-link): kind in file, dir, sym, hard, chr, fifo."""
    kinds = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "sym": tarfile.SYMTYPE,
        "hard": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    with tarfile.open(path, "w") as tar:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            info.type = kinds[kind]
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind in ("sym", "hard"):
                info.linkname = data
            tar.addfile(info)
    return path


def _zip(path: Path, entries: list[tuple[str, str, bytes | str]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for kind, name, data in entries:
            info = zipfile.ZipInfo(name)
            if kind == "sym":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            elif kind == "chr":
                info.external_attr = (stat.S_IFCHR | 0o600) << 16
            zf.writestr(info, data)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """(archive folder, extraction root, an 'outside' folder that must stay untouched)."""
    (tmp_path / "archives").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("mine")
    return tmp_path / "archives", tmp_path / "work" / "root", tmp_path / "outside"


def _assert_untouched(root: Path, outside: Path) -> None:
    assert not root.exists(), "nothing may be written before the archive is checked"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "mine"
    leftovers = list(root.parent.iterdir()) if root.parent.exists() else []
    assert leftovers == [], leftovers


def _evil_tars(outside: Path) -> dict[str, list]:
    return {
        "traversal": [("file", "ok.txt", b"fine"), ("file", "../outside/evil.txt", b"x")],
        "nested traversal": [("file", "a/../../outside/evil.txt", b"x")],
        "absolute path": [("file", str(outside / "evil.txt"), b"x")],
        "symlink out": [("sym", "link", "../../outside"), ("file", "link/evil.txt", b"x")],
        "symlink out alone": [("sym", "data/link", "../../outside/keep.txt")],
        "absolute symlink": [("sym", "link", str(outside))],
        # lexically inside; really the parent
        "symlink chain": [("sym", "a", "."), ("sym", "b", "a/..")],
        "hardlink out": [("hard", "h", "../outside/keep.txt")],
        "absolute hardlink": [("hard", "h", str(outside / "keep.txt"))],
        "hardlink through symlink": [("sym", "up", ".."), ("hard", "h", "up/outside/keep.txt")],
        "under inside symlink": [
            ("dir", "sub", b""),
            ("sym", "s", "sub"),
            ("file", "s/x.txt", b"x"),
        ],
        "device file": [("chr", "dev/evil", b"")],
        "fifo": [("fifo", "pipe", b"")],
    }


@pytest.mark.parametrize("case", list(_evil_tars(Path("/x"))))
def test_malicious_tar_is_refused_before_writing(sandbox, case):
    archives, root, outside = sandbox
    archive = _tar(archives / "evil.tar", _evil_tars(outside)[case])
    with pytest.raises(UnsafeArchiveError, match="refusing|outside"):
        safe_extract(archive, root)
    _assert_untouched(root, outside)


@pytest.mark.parametrize(
    "case,entries",
    [
        ("traversal", [("file", "ok.txt", b"fine"), ("file", "../outside/evil.txt", b"x")]),
        ("backslash traversal", [("file", "..\\outside\\evil.txt", b"x")]),
        ("absolute path", [("file", "/tmp/evil-msl-kit.txt", b"x")]),
        ("drive letter", [("file", "C:/evil.txt", b"x")]),
        ("symlink out", [("sym", "link", "../../outside")]),
        ("absolute symlink", [("sym", "link", "/etc")]),
        ("under symlink", [("sym", "link", "sub"), ("file", "link/x.txt", b"x")]),
        ("device file", [("chr", "dev", b"")]),
    ],
)
def test_malicious_zip_is_refused_before_writing(sandbox, case, entries):
    archives, root, outside = sandbox
    archive = _zip(archives / "evil.zip", entries)
    with pytest.raises(UnsafeArchiveError, match="refusing|outside"):
        safe_extract(archive, root)
    _assert_untouched(root, outside)
    assert not Path("/tmp/evil-msl-kit.txt").exists()


def test_tar_with_inside_links_extracts(sandbox):
    archives, root, _ = sandbox
    archive = _tar(
        archives / "ok.tar",
        [
            ("dir", "top", b""),
            ("file", "top/a.txt", b"alpha"),
            ("sym", "top/link.txt", "a.txt"),
            ("hard", "top/hard.txt", "top/a.txt"),
            ("sym", "top/self", "../top"),
        ],
    )
    safe_extract(archive, root)
    link = root / "top" / "link.txt"
    assert link.is_symlink() and link.read_text() == "alpha"
    assert (root / "top" / "hard.txt").read_text() == "alpha"
    assert [p.name for p in root.parent.iterdir()] == ["root"]  # the temp folder is gone


def test_zip_with_inside_symlink_extracts_as_a_link(sandbox):
    archives, root, _ = sandbox
    archive = _zip(
        archives / "ok.zip", [("file", "d/a.txt", b"alpha"), ("sym", "d/link.txt", "a.txt")]
    )
    safe_extract(archive, root)
    link = root / "d" / "link.txt"
    assert link.is_symlink() and link.read_text() == "alpha"


@pytest.mark.parametrize("maker,ext", [(tar_bytes, "tgz"), (zip_bytes, "zip")])
def test_extraction_replaces_same_named_entries_and_keeps_others(tmp_path, maker, ext):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "half-written.jpg").write_bytes(b"junk")
    (root / "downloads").mkdir()
    archive = tmp_path / f"a.{ext}"
    archive.write_bytes(maker({"data/x.txt": b"new", "top.txt": b"t"}))
    safe_extract(archive, root)
    assert sorted(p.name for p in (root / "data").iterdir()) == ["x.txt"]
    assert (root / "downloads").is_dir() and (root / "top.txt").read_text() == "t"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a.{ext}", "root"]


def _cut(data: bytes, at: int | None = None) -> bytes:
    return data[: len(data) // 2 if at is None else at]


_FILES = {f"d/{i}.bin": os.urandom(50_000) for i in range(4)}


@pytest.mark.parametrize(
    "case,data",
    [
        ("tgz cut in half", lambda: _cut(tar_bytes(_FILES))),
        ("tgz cut inside its first header", lambda: _cut(tar_bytes(_FILES), 100)),
        ("tar cut inside a member", lambda: _cut(tar_bytes(_FILES, mode="w"), 600 + 25_000)),
        ("zip cut in half", lambda: _cut(zip_bytes(_FILES))),
        (
            "zip with a corrupt member",
            lambda: zip_bytes(_FILES).replace(_FILES["d/1.bin"][:64], bytes(64), 1),
        ),
    ],
)
def test_truncated_archive_is_one_damaged_archive_error_and_writes_nothing(tmp_path, case, data):
    (tmp_path / "a.archive").write_bytes(data())
    with pytest.raises(
        DamagedArchiveError,
        match=r"a.archive is truncated or damaged .*; "
        r"nothing was extracted. Delete it and download it again",
    ):
        safe_extract(tmp_path / "a.archive", tmp_path / "root")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.archive"]
    assert isinstance(DamagedArchiveError(), OSError)  # the CLI's one line and exit 2


def test_foreign_file_is_not_an_archive(tmp_path):
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="neither a zip nor a tar"):
        safe_extract(tmp_path / "notes.txt", tmp_path / "root")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("maker", [tar_bytes, zip_bytes])
@pytest.mark.parametrize(
    "limit,pattern",
    [
        ({"max_members": 3}, r"holds more than 3 members; refusing to extract .*--max-files N"),
        ({"max_bytes": 150_000}, r"declares more than 150.0 kB of files; refusing .*--max-size GB"),
    ],
)
def test_archive_limits_refuse_before_writing(sandbox, maker, limit, pattern):
    archives, root, outside = sandbox
    archive = archives / "big.archive"
    archive.write_bytes(maker(_FILES))  # 4 files of 50 kB (+ their folder in the tar)
    with pytest.raises(ArchiveLimitError, match=pattern):
        safe_extract(archive, root, **limit)
    _assert_untouched(root, outside)
    safe_extract(archive, root, max_members=5, max_bytes=200_000)  # exactly at the limits
    assert len(list((root / "d").iterdir())) == 4


def test_bomb_is_refused_at_its_first_header_unless_a_size_is_given(sandbox):
    archives, root, outside = sandbox
    bomb = archives / "bomb.tgz"
    bomb.write_bytes(bomb_tgz())  # 3 MB declaring 3 GiB
    with pytest.raises(
        ArchiveLimitError,
        match=r"bomb.tgz \(3.0 MB\) declares 3.2 GB of files, "
        r"over 100x its size as a decompression bomb",
    ):
        safe_extract(bomb, root)
    _assert_untouched(root, outside)
    with pytest.raises(ArchiveLimitError, match="declares more than 1.0 GB"):
        safe_extract(bomb, root, max_bytes=10**9)
    _assert_untouched(root, outside)
    # allowed explicitly, its missing bytes show as damage; what was written is removed
    with pytest.raises(DamagedArchiveError, match="truncated or damaged"):
        safe_extract(bomb, root, max_bytes=4 * 10**9)
    _assert_untouched(root, outside)
