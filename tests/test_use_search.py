"""`msl-kit search`: exact top-k against a naive reference and faiss, self-exclusion by path only,
refusals in one line (another checkpoint, another dimension, faiss missing), CSV and grid."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from _fixtures_use import held_out_tree, tiny_run
from PIL import Image

from msl_kit import cli
from msl_kit.use.embedding import embed
from msl_kit.use.index import Embeddings
from msl_kit.use.retrieval import faiss_backend, search, write_csv
from msl_kit.viz.retrieval import hits_grid


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def small(tmp_path_factory, run):
    """120 held-out images (6 characters) embedded into small.npz."""
    base = tmp_path_factory.getbasetemp()
    _, written = held_out_tree(base, limit=120)
    rows = ["path,label"] + [f"{p},{p.split('/')[-2]}" for p in written]
    (base / "small.csv").write_text("\n".join(rows) + "\n")
    embed(run, base / "small.csv", base / "small.npz", progress=False)
    return base / "small.npz", written


def random_set(n: int, d: int, seed: int, prefix: str) -> Embeddings:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return Embeddings(x, np.array([f"{prefix}{i}" for i in range(n)]), checkpoint_sha256="s")


def naive(query: np.ndarray, gallery: np.ndarray, k: int, skip: np.ndarray):
    sims = query @ gallery.T
    sims[np.arange(len(query))[skip >= 0], skip[skip >= 0]] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def test_exact_and_faiss_match_a_naive_search_excluding_only_the_query_itself(tmp_path):
    gallery = random_set(500, 32, 0, "g")
    outside = random_set(30, 32, 1, "q")  # a separate query set: nothing excluded
    inside = Embeddings(gallery.embeddings[:20], gallery.paths[:20], checkpoint_sha256="s")
    index = tmp_path / "g.npz"
    for query, skip in ((outside, np.full(30, -1)), (inside, np.arange(20))):
        hits = gallery.search(query, 7)
        ref_s, ref_i = naive(query.embeddings, gallery.embeddings, 7, skip)
        np.testing.assert_array_equal(hits.indices, ref_i)
        np.testing.assert_allclose(hits.scores, ref_s, atol=1e-5)
        backend = faiss_backend(index, gallery)
        f_hits = gallery.search(query, 7, backend=backend)
        np.testing.assert_array_equal(f_hits.indices, ref_i)
    kept = gallery.search(inside, 3, exclude_self=False)
    assert (kept.indices[:, 0] == np.arange(20)).all()


def test_faiss_index_is_saved_beside_and_reused_while_it_matches(tmp_path):
    gallery = random_set(200, 16, 0, "g")
    index = tmp_path / "g.npz"
    notes = []
    faiss_backend(index, gallery, log=notes.append)
    assert notes[-2].startswith("built") and (tmp_path / "g.flat.faiss").is_file()
    faiss_backend(index, gallery, log=notes.append)
    assert notes[-2].startswith("reused")
    changed = random_set(200, 16, 5, "g")  # same size, other vectors: rebuilt, not trusted
    backend = faiss_backend(index, changed, log=notes.append)
    assert "built over other vectors" in notes[-4] and notes[-2].startswith("built")
    np.testing.assert_array_equal(backend(changed.embeddings[:3], 1)[1][:, 0], [0, 1, 2])


def test_cli_search_writes_table_csv_and_grid(small, tmp_path, capsys):
    index, written = small
    query = tmp_path / "q"
    query.mkdir()
    shutil.copy(written[0], query / "a.png")
    Image.open(written[5]).resize((64, 80)).save(query / "b.png")  # another size: resized
    args = ["search", "--index", str(index), "--query", str(query), "-k", "4"]
    args += ["--out", str(tmp_path / "r.csv"), "--grid", str(tmp_path / "g.png"), "--faiss"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("query ") == 2 and "rank" in out and "score" in out
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == "query,rank,score,path" and len(lines) == 1 + 2 * 4  # a flat folder
    first = lines[1].split(",")
    assert first[3] == written[0] and float(first[2]) > 0.999  # a copy of a gallery image
    with Image.open(tmp_path / "g.png") as png:
        assert png.size[0] > 500 and png.size[1] > 200
        assert png.info["Software"] == "msl-kit search --grid"  # marked: --grid may replace it
    assert (index.with_suffix(".flat.faiss")).is_file()


def test_grid_colours_hits_and_misses(small):
    index, _ = small
    gallery = Embeddings.load(index)
    hits = gallery.search(gallery, 3)
    fig = hits_grid(hits, n_queries=2)
    frames = [ax.spines["top"].get_edgecolor() for ax in fig.axes]
    assert len(fig.axes) == 2 * 4
    same = hits.hits()[np.unique(np.linspace(0, len(gallery) - 1, 2).round().astype(int))]
    from matplotlib.colors import to_rgba

    expected = [
        to_rgba(c)
        for row in same
        for c in ["#222222"] + ["#1a9850" if h else "#d73027" for h in row]
    ]
    assert frames == expected
    title = fig.get_suptitle()  # the model that searched, then what the colours mean
    assert title.startswith("searched with use_run/checkpoint.pt\ngreen: same class")


def test_refusals_are_one_line(run, small, tmp_path, capsys, monkeypatch):
    index, written = small
    base = ["search", "--index", str(index), "--query"]

    def error() -> str:
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err

    other = tmp_path / "other.pt"
    other.write_bytes((run / "checkpoint.pt").read_bytes() + b"\0")  # not the same file
    assert cli.main([*base, written[0], "--checkpoint", str(other)]) == 2
    assert "sha256 differs" in error()
    assert cli.main([*base, str(index), "--checkpoint", str(other)]) == 2  # an index query too
    assert "sha256 differs" in error()
    foreign = Embeddings.load(index)
    rogue = tmp_path / "rogue.npz"
    shutil.copy(index, rogue)
    with np.load(rogue) as z:
        members = {k: z[k] for k in z.files}
    from msl_kit.use.index import write_npz

    members["checkpoint_sha256"] = np.array("0" * 64)
    with open(rogue, "wb") as f:
        write_npz(f, members.items())
    assert cli.main([*base, str(rogue)]) == 2
    assert "another checkpoint" in error()
    members["checkpoint_sha256"] = np.array(foreign.checkpoint_sha256)
    members["embeddings"] = np.zeros((len(foreign), 8), np.float32)
    with open(rogue, "wb") as f:
        write_npz(f, members.items())
    assert cli.main([*base, str(rogue)]) == 2
    err = error()
    assert "(120, 8)" in err and "64-d" in err
    assert cli.main(["search", "--index", str(written[0]), "--query", written[0]]) == 2
    assert "not an embeddings file" in error()
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    assert cli.main([*base, str(index), "--faiss"]) == 2
    assert "pip install faiss-cpu" in error()


def test_python_api_search_and_csv(small, tmp_path):
    index, written = small
    hits = search(index, written[0], k=2, exclude_self=False)
    assert hits.gallery.paths[hits.indices[0, 0]] == written[0]
    write_csv(hits, tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text().count("\n") == 3


def test_thumbnail_titles_keep_the_class_whole_and_fit():
    from msl_kit.viz.retrieval import short

    assert short("Japanese_(katakana)/character23") == "Japane../character23"
    assert short("Latin/character21") == "Latin/character21"
    long_flat = "a_very_long_file_name_without_folders.png"
    assert len(short(long_flat)) == 20 and short(long_flat).startswith("a_very_lo..")
