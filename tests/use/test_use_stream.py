"""Embeddings files that scale (issue 27 item 2): format 2 maps its vectors, paths and labels from
the file and reads a path only when asked; its strings column against numpy's str arrays; the
gallery scanned against the queries' paths against the old whole-array reference; old files
(format 1, and files from before `embeddings_sha256` / `inputs` / `skipped_reasons`) still load
and search; damaged or consistently cut columns are refused or redone; listing and search hold
no list of every path (tracemalloc)."""

from __future__ import annotations

import os
import shutil
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from msl_kit import cli
from msl_kit.errors import MslKitError
from msl_kit.use.columns import Texts, TextsWriter, encode
from msl_kit.use.embedding import embed
from msl_kit.use.index import Embeddings, write_npz
from msl_kit.use.listing import csv_images
from msl_kit.use.ranks import Ranks
from msl_kit.use.retrieval import search, vectors_crc32

NAMES = ["/a/b.png", "/x/caf\udce9.png", "", "y", "/a/b.png", "ü/ß", "/x/\udcff\udcfe", "z"]


@pytest.fixture(scope="module")
def run(use_run) -> Path:
    return use_run


@pytest.fixture(scope="module")
def written(held_out) -> list[str]:
    return held_out[1][:120]


def labelled_csv(path: Path, files: list[str]) -> Path:
    path.write_text("path,label\n" + "".join(f"{p},{Path(p).parent.name}\n" for p in files))
    return path


# ----------------------------------------------------------------------------- the column
def test_texts_index_like_a_numpy_str_array_and_keep_non_utf8_bytes():
    ref = np.array(NAMES)
    col = Texts.of(NAMES)
    assert len(col) == len(ref) and col.shape == ref.shape and list(col) == NAMES
    for key in (0, 3, -1, -8):
        assert col[key] == ref[key]
    for key in (slice(1, 6), slice(None, None, -2), slice(5, 2)):
        np.testing.assert_array_equal(col[key], ref[key])
    rows = np.array([[7, 0], [1, 1]])
    np.testing.assert_array_equal(col[rows], ref[rows])
    np.testing.assert_array_equal(col[ref == "y"], ["y"])
    np.testing.assert_array_equal(col == "/a/b.png", ref == "/a/b.png")
    np.testing.assert_array_equal(col[:, None], ref[:, None])
    with pytest.raises(IndexError):
        col[8]
    assert encode(col[1]) == b"/x/caf\xe9.png"  # the name's own bytes, as os.fsencode gives


def test_a_written_column_reads_back_mapped_and_pickles_as_its_file_names(tmp_path):
    import pickle

    writer = TextsWriter(tmp_path / "names")
    writer.add(NAMES * 10_000)  # crosses a block
    col = writer.close()
    assert isinstance(col.blob, np.memmap) and len(col) == 80_000 and col.check() == ""
    assert col[8 * 9_999 + 1] == NAMES[1] and list(col[-8:]) == NAMES
    assert len(pickle.dumps(col)) < 1000  # a DataLoader worker gets the names, not the bytes
    assert list(pickle.loads(pickle.dumps(col))[:8]) == NAMES


# ----------------------------------------------------------------------------- the format
def test_an_index_maps_its_aligned_columns_and_np_load_still_reads_it(run, written, tmp_path):
    index = tmp_path / "g.npz"
    emb = embed(run, labelled_csv(tmp_path / "l.csv", written[:40]), index, progress=False)
    assert isinstance(emb.embeddings, np.memmap) and isinstance(emb.labels, np.memmap)
    assert isinstance(emb.paths, Texts) and emb.paths.tolist() == written[:40]
    with zipfile.ZipFile(index) as zf, open(index, "rb") as f:
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            f.seek(info.header_offset + 26)
            name, extra = np.frombuffer(f.read(4), "<u2")
            assert (info.header_offset + 30 + name + extra) % 64 == 0, info.filename
    with np.load(index) as z:  # a plain numpy archive: the paths are one NUL-separated blob
        assert z["paths"].dtype == np.uint8 and z["format"] == "msl-kit embeddings 2"
        assert [p.decode() for p in bytes(z["paths"]).split(b"\0")[:-1]] == written[:40]
        np.testing.assert_array_equal(z["embeddings"], emb.embeddings)
    eager = Embeddings.load(index, lazy=False)
    assert not isinstance(eager.embeddings, np.memmap)
    np.testing.assert_array_equal(eager.embeddings, emb.embeddings)
    from msl_kit.use.ann.spec import vectors_sha256

    assert emb.embeddings_sha256 == vectors_sha256(np.asarray(emb.embeddings))
    with zipfile.ZipFile(index) as zf:
        assert vectors_crc32(index) == zf.getinfo("embeddings.npy").CRC != 0


def _old_file(path: Path, emb: Embeddings, *, before_digests: bool = False) -> None:
    """`emb` written as format 1 wrote it: paths and skipped as fixed-width str arrays; with
    `before_digests`, as the files from before `embeddings_sha256` / `inputs` /
    `skipped_reasons` existed."""
    members = [("embeddings", np.asarray(emb.embeddings)), ("paths", np.asarray(emb.paths))]
    members += [("labels", np.asarray(emb.labels)), ("classes", np.array(emb.classes))]
    members += [("skipped", np.array(["/gone.png"], dtype=str))]
    if not before_digests:
        members += [("skipped_reasons", np.array(["not an image"])), ("inputs", np.array(41))]
        members += [("embeddings_sha256", np.array(emb.embeddings_sha256))]
    members += [("checkpoint", np.array(emb.checkpoint))]
    members += [("checkpoint_sha256", np.array(emb.checkpoint_sha256))]
    members += [("format", np.array("msl-kit embeddings 1"))]
    with open(path, "wb") as f:
        write_npz(f, members)


@pytest.mark.parametrize("before_digests", [False, True])
def test_old_files_load_and_search_as_the_new_one(run, written, tmp_path, before_digests, capsys):
    new = tmp_path / "new.npz"
    emb = embed(run, labelled_csv(tmp_path / "l.csv", written[:40]), new, progress=False)
    old = tmp_path / "old.npz"
    _old_file(old, emb, before_digests=before_digests)
    back = Embeddings.load(old)
    assert isinstance(back.paths, np.ndarray) and back.paths.tolist() == written[:40]
    assert back.skipped == ("/gone.png",) and back.inputs == (-1 if before_digests else 41)
    a, b = search(new, new, k=3), search(old, old, k=3)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.rows() == b.rows() and a.recall_at_1() == b.recall_at_1()
    assert cli.main(["search", "--index", str(old), "--query", written[0], "-k", "2"]) == 0
    assert f"query {written[0]}" in capsys.readouterr().out


def test_an_old_file_is_replaced_by_the_new_format_on_the_next_embed(run, written, tmp_path):
    images = labelled_csv(tmp_path / "l.csv", written[:40])
    out = tmp_path / "e.npz"
    first = embed(run, images, out, progress=False)
    whole = out.read_bytes()
    _old_file(tmp_path / "old.npz", first)
    shutil.copy(tmp_path / "old.npz", out)  # replaced by rename, not rewritten in place
    again = embed(run, images, out, progress=False)
    assert isinstance(again.paths, Texts) and out.read_bytes() == whole


# ----------------------------------------------------------------------------- damage
def _rewrite(path: Path, change) -> None:
    with np.load(path) as z:
        members = {k: z[k] for k in z.files}
    change(members)
    tmp = path.with_name("rewritten.npz")
    with open(tmp, "wb") as f:
        write_npz(f, members.items())
    os.replace(tmp, path)


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda m: m.update(paths=m["paths"][:-5]), "offsets from 0 to"),
        (lambda m: m["paths"].__setitem__(3, 0), "(paths): strings 0..39 do not match"),
        (lambda m: m["paths_offsets"].__setitem__(2, 1), "do not increase"),
        (lambda m: m.update(paths_offsets=m["paths_offsets"][:-1]), "bytes): re-embed it"),
    ],
    ids=["blob cut short", "a NUL inside a path", "offsets decreasing", "an offset missing"],
)
def test_a_damaged_paths_column_is_one_line_and_redone_by_embed(
    run, written, tmp_path, damage, says, capsys
):
    images = labelled_csv(tmp_path / "l.csv", written[:40])
    out = tmp_path / "e.npz"
    embed(run, images, out, progress=False)
    whole = out.read_bytes()
    _rewrite(out, damage)
    assert cli.main(["search", "--index", str(out), "--query", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and says in err, err
    embed(run, images, out, progress=False)
    assert out.read_bytes() == whole


def test_a_consistently_cut_file_of_the_same_job_is_never_up_to_date(run, written, tmp_path):
    """Every column cut to 21 of 40 rows, the fingerprint kept: a file that loads, claims the
    job, and is still redone (it does not hold every input)."""
    images = labelled_csv(tmp_path / "l.csv", written[:40])
    out = tmp_path / "e.npz"
    embed(run, images, out, progress=False)
    whole = out.read_bytes()

    def cut(m: dict) -> None:
        end = int(m["paths_offsets"][21])
        m.update(embeddings=m["embeddings"][:21], labels=m["labels"][:21])
        m.update(paths=m["paths"][:end], paths_offsets=m["paths_offsets"][:22])
        m.update(inputs=np.array(21))

    _rewrite(out, cut)
    assert len(Embeddings.load(out)) == 21
    assert len(embed(run, images, out, progress=False)) == 40
    assert out.read_bytes() == whole


def test_embedding_with_loader_workers_gives_the_same_file(run, written, tmp_path):
    images = labelled_csv(tmp_path / "l.csv", written[:24])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    embed(run, images, tmp_path / "a" / "e.npz", workers=0, chunk_size=8, progress=False)
    embed(run, images, tmp_path / "b" / "e.npz", workers=2, chunk_size=8, progress=False)
    assert (tmp_path / "a" / "e.npz").read_bytes() == (tmp_path / "b" / "e.npz").read_bytes()


# ----------------------------------------------------------------------------- own rows
def _naive_leave_out(x: np.ndarray, gallery: np.ndarray, q: np.ndarray, q_paths, k: int):
    """Every gallery row ranked by score (ties: lower row first), the query's own path's rows
    dropped, the first k kept; k shrinks to what the shortest query has."""
    sims = q @ x.T
    ranked = [
        [int(i) for i in np.lexsort((np.arange(len(x)), -row)) if gallery[i] != path]
        for row, path in zip(sims, q_paths)
    ]
    k = min(k, *(len(r) for r in ranked))
    idx = np.array([r[:k] for r in ranked])
    return np.take_along_axis(sims, idx, 1), idx


@pytest.mark.parametrize("as_column", [True, False])
@pytest.mark.parametrize("k", [1, 3, 40])
def test_a_search_leaves_out_each_querys_own_rows_as_a_whole_ranking_does(as_column, k):
    """Paths listed up to 12 times (the search must ask again for more), queries in the gallery
    and not, and a gallery too small for k = 40 once a query's own rows are out."""
    rng = np.random.default_rng(0)
    names = np.array([f"/g/{i}.png" for i in range(20)] + NAMES)
    gallery = names[rng.integers(0, len(names), 48)]  # 48 rows, many paths listed often
    x = rng.standard_normal((48, 8)).astype(np.float32)
    x[::7] = x[1]  # equal scores: ranked by row
    rows = rng.integers(0, 48, 10)
    q_paths = np.concatenate([gallery[rows], ["/nowhere.png", "y"]])
    q = rng.standard_normal((len(q_paths), 8)).astype(np.float32)
    q[:10] = x[rows] + 0.01 * q[:10]  # a query's own rows rank first
    emb = Embeddings(x, Texts.of(gallery) if as_column else gallery)
    hits = emb.search(Embeddings(q, q_paths), k)
    want_scores, want = _naive_leave_out(x, gallery, q, q_paths, k)
    np.testing.assert_array_equal(hits.indices, want)
    np.testing.assert_allclose(hits.scores, want_scores, rtol=1e-5, atol=1e-6)
    assert not (gallery[hits.indices] == q_paths[:, None]).any()
    kept = emb.search(Embeddings(q, q_paths), k, exclude_self=False)
    assert kept.indices.shape == (len(q), min(k, 48))  # without leaving out, as asked


def test_a_gallery_of_only_the_querys_own_path_says_so_in_one_line():
    emb = Embeddings(np.eye(3, dtype=np.float32), np.array(["/a.png"] * 3))
    with pytest.raises(MslKitError, match="no image other than the query itself"):
        emb.search(Embeddings(np.eye(3, dtype=np.float32)[:1], np.array(["/a.png"])), 2)


@pytest.mark.parametrize("as_column", [True, False])
def test_positions_are_each_paths_last_row_as_a_dict_of_every_path_gives(as_column):
    rng = np.random.default_rng(0)
    names = np.array([f"/g/{i}.png" for i in range(300)] + NAMES)
    gallery = names[rng.integers(0, len(names), 2000)]  # many paths listed several times
    query = np.concatenate([gallery[rng.integers(0, 2000, 50)], ["/nowhere.png", "y"]])
    emb = Embeddings(np.zeros((2000, 2), np.float32), Texts.of(gallery) if as_column else gallery)
    last = {p: i for i, p in enumerate(gallery.tolist())}
    np.testing.assert_array_equal(emb.positions(query), [last.get(p, -1) for p in query])


def test_search_over_a_mapped_gallery_excludes_only_the_querys_own_rows(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    paths = np.array([f"/g/{i % 450}.png" for i in range(500)])  # 50 paths listed twice
    col = Texts.of(paths)
    members = [("embeddings", x), ("paths", col.blob), ("paths_offsets", col.offsets)]
    members += [("checkpoint_sha256", np.array("c")), ("format", np.array("msl-kit embeddings 2"))]
    with open(tmp_path / "g.npz", "wb") as f:
        write_npz(f, members)
    mapped = Embeddings.load(tmp_path / "g.npz")
    in_memory = Embeddings(x, paths, checkpoint_sha256="c")
    query = Embeddings(x[440:460], paths[440:460], checkpoint_sha256="c")
    a, b = mapped.search(query, 5), in_memory.search(query, 5)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not (paths[a.indices] == paths[440:460, None]).any()
    assert a.rows() == b.rows()


# ----------------------------------------------------------------------------- memory
def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_listing_and_scanning_50000_paths_hold_no_list_of_them(tmp_path):
    """The listing of a 50,000-row CSV and a scan of a 50,000-path gallery against 10 query
    paths peak at under half of what a list of the paths takes; what they replaced (a list
    of paths, a fixed-width array of them, a dict of every path) took more than the list."""
    n = 50_000
    names = [f"/msl_kit_nowhere/{i // 1000:03d}/{i:07d}_a_long_file_name.jpg" for i in range(n)]
    (tmp_path / "big.csv").write_text("".join(f"{p},c{i % 500}\n" for i, p in enumerate(names)))
    whole_list = sum(sys.getsizeof(p) + 8 for p in names)  # ~5 MB
    del names
    (tmp_path / "listing").mkdir()
    found = []
    peak = _peak(lambda: found.append(csv_images(tmp_path / "big.csv", tmp_path / "listing")))
    items = found.pop()
    assert len(items.paths) == n and len(items.classes) == 500
    assert items.classes[items.labels[-1]] == f"c{(n - 1) % 500}"
    assert items.paths[-1] == f"/msl_kit_nowhere/049/{n - 1:07d}_a_long_file_name.jpg"
    assert peak < whole_list / 2, (peak, whole_list)
    gallery = Embeddings(np.zeros((n, 1), np.float32), items.paths)
    queries = items.paths[np.arange(0, n, n // 10)]
    peak = _peak(lambda: found.append(gallery.positions(queries)))
    assert peak < whole_list / 2, (peak, whole_list)
    np.testing.assert_array_equal(found.pop(), np.arange(0, n, n // 10))


def test_a_listed_path_holding_a_nul_is_one_line_and_leaves_nothing(run, tmp_path, capsys):
    images = tmp_path / "nul.csv"
    images.write_text("path\nfine.png\nbad\0name.png\n")
    out = tmp_path / "e.npz"
    code = cli.main(["embed", "--checkpoint", str(run), "--images", str(images), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (
        err == f"error: {images}: the path 'bad\\x00name.png' holds a NUL byte, which no "
        "file name can: fix that row"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nul.csv"]  # no OUT.part/, no lock


# ----------------------------------------------------------------------------- ranks
def test_a_rank_without_its_own_gpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cuda = torch.device("cuda")
    assert Ranks(0, 2, 0).device(cuda) == torch.device("cuda", 0)
    assert Ranks(0, 1, 0).device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(MslKitError, match=r"LOCAL_RANK=1 but only 1 GPUs are visible; lower"):
        Ranks(1, 2, 1).device(cuda)
