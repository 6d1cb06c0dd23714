"""Issue 24, embed and search as a hostile user tries them: each test is one numbered case of
the issue, reproduced as the issue describes it (`test_<item>_...`); docs/reliability.md has
one row per case.

1 two writers of one --out, a truncated index · 2 the kit's own outputs as inputs · 4 search
--out / --grid over files of another kind · 9 symlinked class folders · 11 one image listed
twice · 12 a CSV with a byte-order mark · 15 a non-UTF-8 file name, a LAB TIFF · 16 a
3,000,000 x 1 PNG · 17 a decompression bomb in the grid · 18 an .npz that lies about its size
· 21 numeric flags out of range · 23 an index searched from another folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from _fixtures_use import held_out_tree, tiny_run
from PIL import Image

from msl_kit import cli
from msl_kit.use.embedding import embed
from msl_kit.use.index import Embeddings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def written(tmp_path_factory) -> list[str]:
    """The held-out drawings as PNG files (the first 400)."""
    return held_out_tree(tmp_path_factory.getbasetemp(), limit=400)[1]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def class_tree(base: Path, written: list[str], classes: dict[str, range]) -> Path:
    """base/<class>/<i>.png for each class, copies of the held-out drawings."""
    for name, items in classes.items():
        (base / name).mkdir(parents=True, exist_ok=True)
        for i in items:
            shutil.copy(written[i], base / name / f"{i}.png")
    return base


def embed_cli(run: Path, images: Path, out: Path, *more: str) -> int:
    args = ["embed", "--checkpoint", str(run), "--images", str(images), "--out", str(out)]
    return cli.main([*args, *more])


def leftovers(folder: Path) -> list[str]:
    """What an embed leaves beside its --out: pieces, locks, temporary files."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".lock", ".tmp")))


# ----------------------------------------------------------------------------- 1 two writers
def _embed_cmd(run: Path, images: Path, out: Path) -> list[str]:
    args = ["--images", str(images), "--out", str(out), "--batch-size", "8", "--chunk-size", "16"]
    return [sys.executable, "-m", "msl_kit.cli", "embed", "--checkpoint", str(run), *args]


@pytest.mark.slow
def test_1_a_second_embed_into_the_same_out_is_refused_and_the_first_completes(
    run, written, tmp_path, capsys
):
    """Two `embed` runs with one --out at once: the second is refused in one line naming the
    first (pid and host), touches nothing, and the first assembles every one of 400 inputs."""
    images = tmp_path / "l.csv"
    images.write_text("\n".join(written[:400]) + "\n")
    out = tmp_path / "index.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_embed_cmd(run, images, out), env=env, stderr=subprocess.PIPE)
    part = tmp_path / "index.npz.part"
    deadline = time.monotonic() + 120
    while not list(part.glob("chunk_*.npz")) and time.monotonic() < deadline:
        time.sleep(0.01)
    pieces = sorted(part.glob("chunk_*.npz"))
    assert pieces and first.poll() is None
    assert embed_cli(run, images, out, "--batch-size", "8", "--chunk-size", "16") == 2
    err = one_error_line(capsys)
    assert f"pid {first.pid} on {socket.gethostname()}" in err and "another msl-kit embed" in err
    assert part.is_dir()  # the second did not delete the first's pieces
    _, log = first.communicate(timeout=300)
    assert first.returncode == 0, log.decode()
    done = Embeddings.load(out)
    assert len(done) + len(done.skipped) == 400 and done.inputs == 400
    assert leftovers(tmp_path) == []


def test_1_an_out_held_by_a_live_process_is_refused_and_a_dead_ones_is_taken_over(
    run, written, tmp_path, capsys
):
    images = class_tree(tmp_path / "photos", written, {"a": range(3), "b": range(20, 23)})
    out = tmp_path / "index.npz"
    lock = tmp_path / ".index.npz.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert embed_cli(run, images, out) == 2
        assert f"pid {holder.pid}" in one_error_line(capsys)
        assert not out.exists() and lock.is_file()  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(RuntimeWarning, match="process that is gone"):
        assert embed_cli(run, images, out) == 0
    assert len(Embeddings.load(out)) == 6 and leftovers(tmp_path) == []


def test_1_a_truncated_index_is_never_up_to_date(run, written, tmp_path):
    """The survivor of two writers used to assemble 216 of 400 images, and a rerun called the
    truncated file up to date: an index is up to date only when it holds every input."""
    images = tmp_path / "l.csv"
    images.write_text("\n".join(written[:40]) + "\n")
    out = tmp_path / "index.npz"
    whole = embed(run, images, out, progress=False)
    with np.load(out) as z:
        members = {k: z[k] for k in z.files}
    for key in ("embeddings", "paths"):  # the same job's file, cut short
        members[key] = members[key][:21]
    from msl_kit.use.index import write_npz

    with open(out, "wb") as f:
        write_npz(f, members.items())
    again = embed(run, images, out, progress=False)
    assert len(again) == 40
    np.testing.assert_array_equal(again.embeddings, whole.embeddings)


# ----------------------------------------------------------------------------- 2 own outputs
def test_2_the_kits_own_outputs_inside_the_images_folder_are_never_inputs(
    run, written, tmp_path, capsys
):
    """`embed --images photos --out photos/index.npz`, run twice: the rerun used to read its
    own index.npz as a top-level file, call the tree flat and replace the labelled index
    with an unlabelled one. Neither it nor pieces, faiss files, search CSVs or grids count."""
    photos = class_tree(tmp_path / "photos", written, {"cats": range(4), "dogs": range(20, 24)})
    out = photos / "index.npz"
    assert embed_cli(run, photos, out) == 0
    first = out.read_bytes()
    assert embed_cli(run, photos, out) == 0
    assert out.read_bytes() == first
    search = ["search", "--index", str(out), "--query", str(out), "-k", "2"]
    assert cli.main([*search, "--out", str(photos / "hits.csv")]) == 0
    assert cli.main([*search, "--grid", str(photos / "grid.png")]) == 0
    (photos / "index.faiss").write_bytes(b"faiss index bytes")
    (photos / "other.npz.part").mkdir()
    (photos / "other.npz.part" / "job.json").write_text('{"job": "x"}')
    assert embed_cli(run, photos, out) == 0
    assert out.read_bytes() == first  # still up to date: the same inputs
    emb = Embeddings.load(out)
    assert emb.classes == ("cats", "dogs") and len(emb) == 8 and not emb.skipped
    assert "8 images -> 64-d vectors, 2 classes" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 4 search outputs
def test_4_search_out_and_grid_never_replace_a_file_of_another_kind(run, written, tmp_path, capsys):
    photos = class_tree(tmp_path / "photos", written, {"a": range(3), "b": range(20, 23)})
    index = tmp_path / "g.npz"
    assert embed_cli(run, photos, index) == 0
    capsys.readouterr()
    mine = tmp_path / "mine.csv"
    mine.write_text("my,own,table\n")
    photo = tmp_path / "photo.png"
    shutil.copy(written[0], photo)
    ckpt = tmp_path / "checkpoint.pt"
    shutil.copy(run / "checkpoint.pt", ckpt)
    before = {p: p.read_bytes() for p in (index, mine, photo, ckpt)}
    base = ["search", "--index", str(index), "--query", str(index), "-k", "2"]
    for flag, target, says in (
        ("--out", index, "must end in .csv"),
        ("--out", ckpt, "must end in .csv"),
        ("--out", mine, "not a CSV written by msl-kit search"),
        ("--grid", photo, "not a grid written by msl-kit search"),
        ("--grid", index, "must end in .png"),
    ):
        assert cli.main([*base, flag, str(target)]) == 2
        assert says in one_error_line(capsys)
    assert {p: p.read_bytes() for p in before} == before
    ours = [tmp_path / "r.csv", tmp_path / "g.png"]
    for _ in range(2):  # its own earlier outputs are replaced
        assert cli.main([*base, "--out", str(ours[0]), "--grid", str(ours[1])]) == 0
    assert ours[0].read_text().startswith("query,rank,score,path")


# ----------------------------------------------------------------------------- 9 symlinks
def test_9_symlinked_class_folders_are_followed_and_loops_and_escapes_skipped_with_why(
    run, written, tmp_path, capsys
):
    """photos/birds -> /elsewhere/birds used to be dropped silently ("3 images, 1 classes";
    torchvision's ImageFolder finds them): a class-folder link is followed wherever it points,
    links inside the tree too; a deeper link leaving its tree and a loop are counted as skipped
    with the reason."""
    photos = class_tree(tmp_path / "photos", written, {"cats": range(3)})
    class_tree(photos / ".store", written, {"dogs": range(20, 23)})
    (photos / "dogs").symlink_to(photos / ".store" / "dogs", target_is_directory=True)
    shutil.copy(written[3], photos / ".store" / "kitten.png")
    (photos / "cats" / "kitten.png").symlink_to(photos / ".store" / "kitten.png")
    outside = class_tree(tmp_path / "elsewhere", written, {"birds": range(40, 43)})
    (photos / "birds").symlink_to(outside / "birds", target_is_directory=True)
    shutil.copy(written[50], outside / "stray.png")
    (photos / "cats" / "far.png").symlink_to(outside / "stray.png")
    (photos / "cats" / "again").symlink_to(photos, target_is_directory=True)
    (photos / "up").symlink_to(tmp_path, target_is_directory=True)  # holds photos: a loop
    out = tmp_path / "index.npz"
    assert embed_cli(run, photos, out) == 0
    printed = capsys.readouterr()
    assert "10 images -> 64-d vectors, 3 classes" in printed.out
    assert "skipped 3 " in printed.err
    emb = Embeddings.load(out)
    names = sorted(emb.class_names().tolist())
    assert names == ["birds"] * 3 + ["cats"] * 4 + ["dogs"] * 3
    assert str(photos / "dogs" / "20.png") in emb.paths.tolist()  # the link's own path
    assert str(photos / "birds" / "40.png") in emb.paths.tolist()
    why = dict(zip(emb.skipped, emb.skipped_reasons))
    assert "leaves" in why[str(photos / "cats" / "far.png")]
    assert "loops back" in why[str(photos / "cats" / "again")]
    assert "loops back" in why[str(photos / "up")]


# ----------------------------------------------------------------------------- 11 duplicates
def test_11_a_csv_listing_one_image_twice_never_finds_itself(run, written, tmp_path):
    rows = ["path,label"] + [f"{p},{Path(p).parent.name}" for p in written[:30]]
    rows.insert(5, rows[1])  # the first image listed twice
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    index = embed(run, tmp_path / "l.csv", tmp_path / "i.npz", progress=False)
    assert len(index) == 31
    hits = index.search(index, 5)
    found = index.paths[hits.indices]
    assert not (found == index.paths[:, None]).any()  # neither copy finds either copy
    kept = index.search(index, 2, exclude_self=False)
    assert (index.paths[kept.indices[[0, 4]]] == written[0]).all()  # both copies, when asked


# ----------------------------------------------------------------------------- 12 BOM
def test_12_a_csv_saved_as_csv_utf8_with_a_byte_order_mark_reads_its_header(run, written, tmp_path):
    rows = ["path,label"] + [f"{p},{Path(p).parent.name}" for p in written[:6]]
    (tmp_path / "l.csv").write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(rows) + "\r\n").encode())
    emb = embed(run, tmp_path / "l.csv", progress=False)
    assert len(emb) == 6 and not emb.skipped
    assert set(emb.classes) == {Path(p).parent.name for p in written[:6]}  # no class "label"


# ----------------------------------------------------------------------------- 15 names, LAB
def test_15_a_non_utf8_file_name_is_embedded_and_a_lab_tiff_is_one_skipped_file(
    run, written, tmp_path, capsys
):
    folder = tmp_path / "old_archive"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1, as old archives name files
    with open(raw, "wb") as f:
        f.write(Path(written[0]).read_bytes())
    shutil.copy(written[1], folder / "ok.png")
    Image.new("LAB", (40, 40), (50, 0, 0)).save(folder / "lab.tif")
    out = tmp_path / "i.npz"
    assert embed_cli(run, folder, out) == 0
    assert "skipped 1 " in capsys.readouterr().err
    emb = Embeddings.load(out)
    assert len(emb) == 2 and os.fsencode(emb.paths[0]) == raw  # stored so it round-trips
    assert Path(emb.paths[0]).is_file()
    assert emb.skipped == (str(folder / "lab.tif"),) and "LAB" in emb.skipped_reasons[0]
    args = ["search", "--index", str(out), "--query", os.fsdecode(raw), "-k", "1"]
    assert cli.main([*args, "--keep-self", "--out", str(tmp_path / "r.csv")]) == 0
    assert "caf\\xe9.png" in capsys.readouterr().out  # shown, not a codec error
    assert raw in (tmp_path / "r.csv").read_bytes()  # the CSV holds the name's own bytes


# ----------------------------------------------------------------------------- 16 per-image work
SPECS = ["convnet", "convnet+two_step", "resnet50", "bninception", "timm:tf_efficientnet_lite0"]


def _spec(name: str):
    import dataclasses

    from msl_kit.models.builder import preprocessing_spec

    backbone, _, crop = name.partition("+")
    spec = preprocessing_spec(backbone)
    return dataclasses.replace(spec, crop=crop) if crop else spec


@pytest.mark.parametrize("name", SPECS)
def test_16_a_3000000_x_1_png_is_skipped_before_any_big_allocation(name, tmp_path):
    """A 3 KB PNG of 3,000,000 x 1 pixels made every resize-first model allocate 12.7 GB."""
    from msl_kit.datasets import transforms

    path = tmp_path / "line.png"
    Image.new("L", (3_000_000, 1), 255).save(path)
    assert path.stat().st_size < 10_000
    tf = transforms.build_transform(_spec(name), train=False)
    start = time.perf_counter()
    with pytest.raises(OSError, match="MAX_RESIZED_PIXELS"):  # skipped as unreadable files are
        tf(transforms.load_image(path, *tf.load_hint))
    assert time.perf_counter() - start < 2


_MEMORY_PROBE = """
import resource, sys, dataclasses
from PIL import Image
from msl_kit.datasets import transforms
from msl_kit.models.builder import preprocessing_spec
vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
soft = vm + 600 * 2**20 if hard == resource.RLIM_INFINITY else min(vm + 600 * 2**20, hard)
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
for name in sys.argv[2:]:
    backbone, _, crop = name.partition('+')
    spec = preprocessing_spec(backbone)
    spec = dataclasses.replace(spec, crop=crop) if crop else spec
    tf = transforms.build_transform(spec, train=False)
    for path in sys.argv[1].split(','):
        try:
            tf(transforms.load_image(path, *tf.load_hint))
            print(name, path, 'ok')
        except transforms.ImageTooLargeError:
            print(name, path, 'refused')
"""


@pytest.mark.slow
def test_16_every_image_the_limits_let_through_fits_600_mb_of_address_space(tmp_path):
    """Under an address-space limit of 600 MB above the imports, the widest image the limits
    accept (200:1, resized to 51,200 x 256) embeds, the 3,000,000 x 1 one is refused, and a
    MemoryError (12.7 GB asked) never comes, for every backbone family and crop mode."""
    wide, line = tmp_path / "wide.png", tmp_path / "line.png"
    Image.new("RGB", (20_000, 100), (200, 10, 10)).save(wide)
    Image.new("L", (3_000_000, 1), 255).save(line)
    code = _MEMORY_PROBE
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    probe = [sys.executable, "-c", code, f"{wide},{line}", *SPECS]
    done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines == [f"{n} {p} {r}" for n in SPECS for p, r in ((wide, "ok"), (line, "refused"))]


def test_16_the_embed_command_counts_it_as_skipped_with_the_limit(run, written, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(written[0], folder / "ok.png")
    Image.new("L", (3_000_000, 1), 255).save(folder / "line.png")
    assert embed_cli(run, folder, tmp_path / "i.npz") == 0
    assert "skipped 1 " in capsys.readouterr().err
    emb = Embeddings.load(tmp_path / "i.npz")
    assert len(emb) == 1 and "MAX_RESIZED_PIXELS" in emb.skipped_reasons[0]


# ----------------------------------------------------------------------------- 17 bomb in grid
def bomb_png(path: Path, side: int = 30_000) -> None:
    """A valid 1-bit PNG of side x side white pixels (900 M pixels in ~100 KB), streamed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    packer = zlib.compressobj(9)
    row = b"\0" + b"\xff" * (side // 8)
    idat = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_17_a_decompression_bomb_in_the_grid_is_drawn_as_not_readable(
    run, written, tmp_path, capsys
):
    photos = class_tree(tmp_path / "photos", written, {"a": range(3), "b": range(20, 23)})
    index = tmp_path / "g.npz"
    assert embed_cli(run, photos, index) == 0
    bomb_png(photos / "a" / "1.png")  # a gallery path now holds a 30000 x 30000 PNG
    assert struct.unpack(">II", (photos / "a" / "1.png").read_bytes()[16:24]) == (30_000, 30_000)
    grid = tmp_path / "grid.png"
    args = ["search", "--index", str(index), "--query", str(index), "-k", "2", "--keep-self"]
    assert cli.main([*args, "--grid", str(grid), "--grid-queries", "6"]) == 0  # every query
    assert "grid written" in capsys.readouterr().out and grid.stat().st_size > 1000
    from msl_kit.viz.retrieval import hits_grid

    gallery = Embeddings.load(index)
    hits = gallery.search(gallery, 2, exclude_self=False)
    bomb = int(np.flatnonzero(gallery.paths == str(photos / "a" / "1.png"))[0])
    fig = hits_grid(hits, queries=[bomb])  # the bomb is the query and its own top hit
    assert [t.get_text() for ax in fig.axes[:2] for t in ax.texts] == ["not\nreadable"] * 2


# ----------------------------------------------------------------------------- 18 lying .npz
def _npy_header(shape: tuple, dtype: str = "<f4") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _index_with(path: Path, index: Path, name: str, member: zipfile.ZipInfo, data: bytes):
    """A copy of `index` whose member `name` is replaced by `data` (written as `member`)."""
    with zipfile.ZipFile(index) as src, zipfile.ZipFile(path, "w", allowZip64=True) as dst:
        for info in src.infolist():
            if info.filename == f"{name}.npy":
                dst.writestr(member, data)
            else:
                dst.writestr(info, src.read(info))


def _deflated_zeros(header: bytes, size: int, block: int = 1 << 20) -> tuple[bytes, int]:
    """A raw deflate stream of `header` + `size` zero bytes, built from one compressed block
    repeated (a full flush after each makes the blocks identical), and its CRC-32."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = packer.compress(header) + packer.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(block)
    one = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    tail = packer.flush()
    crc = zlib.crc32(header)
    for _ in range(size // block):
        crc = zlib.crc32(zeros, crc)
    return head + one * (size // block) + tail, crc


def _with_raw_member(path: Path, index: Path, name: str, stream: bytes, crc: int, size: int):
    """A copy of `index` whose member `name` is the deflate `stream` (never inflated here),
    declared as `size` bytes with checksum `crc`."""
    with zipfile.ZipFile(index) as src, zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for info in src.infolist():
            if info.filename != name:
                zf.writestr(info, src.read(info))
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.CRC, info.compress_size, info.file_size = crc, len(stream), size
        info.header_offset = zf.fp.tell()
        zf.fp.write(info.FileHeader(zip64=True))
        zf.fp.write(stream)
        zf.filelist.append(info)
        zf.NameToInfo[name] = info
        zf.start_dir = zf.fp.tell()


@pytest.mark.parametrize(
    "case",
    [
        "shape 10^6 x 10^6",
        pytest.param("8 MB inflating to 8 GiB", marks=pytest.mark.slow),  # 4 s: its CRC-32
        "objects",
    ],
)
def test_18_an_npz_that_lies_about_its_size_is_refused_before_any_array_is_read(
    case, run, written, tmp_path, capsys
):
    photos = class_tree(tmp_path / "photos", written, {"a": range(2), "b": range(20, 22)})
    index = tmp_path / "g.npz"
    assert embed_cli(run, photos, index) == 0
    evil = tmp_path / "evil.npz"
    member = zipfile.ZipInfo("embeddings.npy", date_time=(1980, 1, 1, 0, 0, 0))
    if case == "shape 10^6 x 10^6":
        _index_with(evil, index, "embeddings", member, _npy_header((10**6, 10**6)) + bytes(64))
    elif case == "objects":
        _index_with(evil, index, "embeddings", member, _npy_header((4,), "|O") + bytes(32))
    else:
        size = 8 << 30
        header = _npy_header((size // 4096, 1024))
        stream, crc = _deflated_zeros(header, size)
        assert 7 << 20 < len(stream) < 9 << 20  # an 8 MB member declaring 8 GiB
        _with_raw_member(evil, index, "embeddings.npy", stream, crc, len(header) + size)
    capsys.readouterr()
    assert cli.main(["search", "--index", str(evil), "--query", str(index)]) == 2
    err = one_error_line(capsys)
    assert "embeddings.npy" in err and "not read" in err


# ----------------------------------------------------------------------------- 21 numeric flags
@pytest.mark.parametrize(
    "flags, says",
    [
        (["--batch-size", "-3"], "--batch-size must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--chunk-size", "0"], "--chunk-size must be an integer >= 1"),
        (["--workers", "-1"], "--workers must be an integer >= 0 (0 reads"),
    ],
)
def test_21_embed_numeric_flags_out_of_range_are_one_line_and_leave_nothing(
    flags, says, run, written, tmp_path, capsys
):
    photos = class_tree(tmp_path / "photos", written, {"a": range(2), "b": range(20, 22)})
    out = tmp_path / "i.npz"
    assert embed_cli(run, photos, out, *flags) == 2
    assert says in one_error_line(capsys)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "flags, says",
    [
        (["-k", "0"], "-k must be at least 1"),
        (["--grid-queries", "0"], "--grid-queries must be at least 1"),
        (["--show", "-2"], "--show must be -1"),
    ],
)
def test_21_search_numeric_flags_out_of_range_are_one_line(
    flags, says, run, written, tmp_path, capsys
):
    photos = class_tree(tmp_path / "photos", written, {"a": range(2), "b": range(20, 22)})
    assert embed_cli(run, photos, tmp_path / "g.npz") == 0
    capsys.readouterr()
    args = ["search", "--index", str(tmp_path / "g.npz"), "--query", str(tmp_path / "g.npz")]
    assert cli.main([*args, "--grid", str(tmp_path / "x.png"), *flags]) == 2
    assert says in one_error_line(capsys) and not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------- 23 other folder
def test_23_an_index_finds_its_checkpoint_from_any_folder(
    run, written, tmp_path, monkeypatch, capsys
):
    """An index stored its checkpoint as typed (`run/checkpoint.pt`): `search --query img.png`
    from another folder said the checkpoint was gone. The absolute path is stored beside the
    sha256, and the path from the index's folder too (a project moved as a whole)."""
    project = tmp_path / "project"
    shutil.copytree(run, project / "run", ignore=shutil.ignore_patterns("snapshots"))
    photos = class_tree(project / "photos", written, {"a": range(3), "b": range(20, 23)})
    monkeypatch.chdir(project)
    assert embed_cli(Path("run/checkpoint.pt"), Path("photos"), Path("g.npz")) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    query = ["--query", str(photos / "a" / "0.png"), "-k", "1", "--keep-self"]
    assert cli.main(["search", "--index", str(project / "g.npz"), *query]) == 0
    assert re.search(r"1\s+1\.0000\s+\S+/a/0\.png", capsys.readouterr().out)
    moved = tmp_path / "moved"
    project.rename(moved)  # the run and the index moved together
    query[1] = str(moved / "photos" / "a" / "0.png")
    assert cli.main(["search", "--index", str(moved / "g.npz"), *query]) == 0
    assert "1.0000" in capsys.readouterr().out
