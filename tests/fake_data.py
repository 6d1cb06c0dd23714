"""Test helpers for the data tests: a local HTTP server with Range support, tiny images, and
archives in each dataset's official layout (the same folders, list files and columns)."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import io
import os
import posixpath
import re
import tarfile
import threading
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------- HTTP server


@dataclass
class Server:
    """Files served on 127.0.0.1; `cut[path] = n` sends only half of the next n responses."""

    files: dict[str, bytes]
    cut: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    base: str = ""

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: Server = self.server.state  # type: ignore[attr-defined]
        path = urllib.parse.urlparse(self.path).path.lstrip("/")
        wanted = self.headers.get("Range")
        state.requests.append((path, wanted))
        if path not in state.files:
            self.send_error(404)
            return
        data, start = state.files[path], 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if state.cut.get(path, 0) > 0:  # a connection lost halfway: the client sees EOF early
            state.cut[path] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(files: dict[str, bytes], **options) -> Iterator[Server]:
    """Serve `files` (path -> bytes) on an ephemeral 127.0.0.1 port for the `with` block."""
    state = Server(dict(files), **options)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = state  # type: ignore[attr-defined]
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# ----------------------------------------------------------------------------- images & archives


def image_bytes(
    seed: int, size: tuple[int, int] = (24, 20), fmt: str = "JPEG", mode: str = "RGB"
) -> bytes:
    """A small image whose colour depends on `seed` (so classes differ)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    noise = rng.integers(-20, 20, size=(size[1], size[0], 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    level = {"compresslevel": 1} if mode == "w:gz" else {}  # 16k-member fakes: speed over size
    with tarfile.open(fileobj=buf, mode=mode, **level) as tar:
        dirs = sorted(
            {
                "/".join(name.split("/")[:i])
                for name in members
                for i in range(1, name.count("/") + 1)
            }
        )
        for d in dirs:  # official archives list their folders too
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def bomb_tgz(declared: int = 3 * 2**30, payload: int = 3 * 10**6) -> bytes:
    """A .tgz whose one member declares `declared` bytes but holds only `payload` random ones:
    the header's size is forged, so a 3 MB file claims 3 GiB without 3 GiB ever existing."""
    info = tarfile.TarInfo("CUB_200_2011/images/huge.jpg")
    info.size, info.mode = declared, 0o644
    raw = info.tobuf(format=tarfile.GNU_FORMAT) + np.random.default_rng(0).bytes(payload)
    return gzip.compress(raw, compresslevel=1)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------- official layouts

CUB_CLASSES = {
    1: "001.Black_footed_Albatross",
    2: "002.Laysan_Albatross",
    100: "100.Brown_Pelican",
    101: "101.White_Pelican",
    200: "200.Common_Yellowthroat",
}


def cub_members(per_class: int = 3, bad_line: str | None = None) -> dict[str, bytes]:
    """CUB_200_2011.tgz's layout: attributes.txt beside CUB_200_2011/ with its list files."""
    images, labels, split, files = [], [], [], {}
    image_id = 0
    for cls, folder in CUB_CLASSES.items():
        for k in range(1, per_class + 1):
            image_id += 1
            rel = f"{folder}/{folder[4:]}_{k:04d}_{image_id}.jpg"
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls}")
            split.append(f"{image_id} {k % 2}")
            files[f"CUB_200_2011/images/{rel}"] = image_bytes(cls * 100 + k)
    if bad_line:
        image_id += 1
        images.append(f"{image_id} {bad_line}")
        labels.append(f"{image_id} 1")
    text = lambda rows: ("\n".join(rows) + "\n").encode()  # noqa: E731
    return {
        "attributes.txt": b"1 has_bill_shape::curved\n",
        "CUB_200_2011/README": b"fixture\n",
        "CUB_200_2011/classes.txt": text(f"{c} {n}" for c, n in CUB_CLASSES.items()),
        "CUB_200_2011/images.txt": text(images),
        "CUB_200_2011/image_class_labels.txt": text(labels),
        "CUB_200_2011/train_test_split.txt": text(split),
        **files,
    }


def omniglot_members(
    top: str, alphabets: dict[str, int], per_char: int = 2, seed: int = 0
) -> dict[str, bytes]:
    """images_background.zip / images_evaluation.zip: top/Alphabet/characterNN/NNNN_MM.png
    (1-bit)."""
    out = {}
    for a, (alphabet, n_chars) in enumerate(alphabets.items()):
        for c in range(1, n_chars + 1):
            for d in range(1, per_char + 1):
                out[f"{top}/{alphabet}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png"] = image_bytes(
                    seed + 1000 * a + 10 * c + d, (12, 12), "PNG", "1"
                )
    return out


CARS_CLASSES = (1, 2, 98, 99, 196)


def cars_files(folder: Path, per_class: int = 2) -> list[Path]:
    """car_ims.tgz (car_ims/NNNNNN.jpg) and cars_annos.mat (annotations, class_names), the files
    the DML papers use (the devkit holds cars_meta.mat and cars_{train,test}_annos.mat instead)."""
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annos = np.zeros((1, per_class * len(CARS_CLASSES)), dtype=[(f, "O") for f in fields])
    members, n = {}, 0
    for cls in CARS_CLASSES:
        for k in range(per_class):
            n += 1
            members[f"car_ims/{n:06d}.jpg"] = image_bytes(cls * 10 + k, (30, 20))
            annos[0, n - 1] = (f"car_ims/{n:06d}.jpg", 1, 1, 29, 19, cls, k % 2)
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"Maker Model {i} 2012" for i in range(1, 197)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "car_ims.tgz").write_bytes(tar_bytes(members))
    savemat(str(folder / "cars_annos.mat"), {"annotations": annos, "class_names": names})
    return [folder / "car_ims.tgz", folder / "cars_annos.mat"]


# The three Cars196 layouts in circulation, at the real counts (or a few classes), tiny images.
# Real: 16,185 images; classes 1-98 hold 8,054, classes 99-196 8,131; the classification split
# (cars_train / cars_test) holds 8,144 / 8,041. Per-class counts are made up to fit those sums.
CARS_NAMES = [f"Maker Model {i} 2012" for i in range(1, 197)]
CARS_NAMES[173] = "Ram C/V Cargo Van Minivan 2012"  # class 174: '/' becomes '-' in folder names
TINY_JPEG = image_bytes(0, (4, 4))


def cars_images(real: bool = True) -> list[tuple[int, str]]:
    """(class id, classification split) per image, class by class."""
    if not real:
        return [(c, split) for c in CARS_CLASSES for split in ("train", "test")]
    out = []
    for cls in range(1, 197):
        n = (82 + (cls <= 18)) if cls <= 98 else (83 - (cls <= 101))
        n_train = n // 2 + (n % 2 and cls > 5)  # 8,144 train in all
        out += [(cls, "train")] * n_train + [(cls, "test")] * (n - n_train)
    return out


def mat_bytes(
    fields: list[str], rows: list[tuple], names: list[str] | None = None, key: str = "annotations"
) -> bytes:
    """A MATLAB file with a 1xN struct array `key` (given fields) and/or a 1xC 'class_names'."""
    from scipy.io import savemat

    content = {}
    if fields:
        annos = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
        for i, row in enumerate(rows):
            annos[0, i] = row
        content[key] = annos
    if names is not None:
        cell = np.empty((1, len(names)), dtype=object)
        cell[0, :] = names
        content["class_names"] = cell
    buf = io.BytesIO()
    savemat(buf, content)
    return buf.getvalue()


def _numbered(images: list[tuple[int, str]], split: str) -> list[tuple[str, int]]:
    """(NNNNN.jpg, class) of one classification split, shuffled so that classes interleave."""
    classes = [c for c, s in images if s == split]
    order = np.random.default_rng(1 if split == "train" else 2).permutation(len(classes))
    return [(f"{n + 1:05d}.jpg", classes[i]) for n, i in enumerate(order)]


_LEGACY_FIELDS = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
_DEVKIT_FIELDS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]


def cars_tree(
    layout: str, images: list[tuple[int, str]]
) -> tuple[dict[str, bytes], dict[str, int]]:
    """The unpacked files of a Cars196 layout, {path: bytes}, and the truth {image path: class}.

    legacy: car_ims/NNNNNN.jpg + cars_annos.mat. torchvision: cars_{train,test}/NNNNN.jpg (the
    same names in both), devkit/{cars_meta, cars_train_annos, cars_test_annos}.mat (the last
    without classes) + cars_test_annos_withlabels.mat. kaggle: car_data/car_data/{train,test}/
    <class name>/NNNNN.jpg + anno_{train,test}.csv (image,x1,y1,x2,y2,class; no header) +
    names.csv (one name a line).
    """
    tree, truth = {}, {}
    if layout == "legacy":
        truth = {f"car_ims/{n:06d}.jpg": c for n, (c, _) in enumerate(images, 1)}
        rows = [
            (p, 1, 1, 3, 3, c, int(s == "test")) for (p, c), (_, s) in zip(truth.items(), images)
        ]
        tree["cars_annos.mat"] = mat_bytes(_LEGACY_FIELDS, rows, CARS_NAMES)
    for split in ("train", "test") if layout != "legacy" else ():
        listed = _numbered(images, split)
        if layout == "torchvision":
            truth.update({f"cars_{split}/{f}": c for f, c in listed})
            target = (
                "devkit/cars_train_annos.mat"
                if split == "train"
                else "cars_test_annos_withlabels.mat"
            )
            tree[target] = mat_bytes(_DEVKIT_FIELDS, [(1, 1, 3, 3, c, f) for f, c in listed])
        else:
            truth.update(
                {
                    f"car_data/car_data/{split}/{CARS_NAMES[c - 1].replace('/', '-')}/{f}": c
                    for f, c in listed
                }
            )
            tree[f"anno_{split}.csv"] = "".join(f"{f},1,1,3,3,{c}\n" for f, c in listed).encode()
    if layout == "torchvision":
        # the devkit's own test list, without classes: never read, so a short one keeps it fast
        tree["devkit/cars_test_annos.mat"] = mat_bytes(
            [f for f in _DEVKIT_FIELDS if f != "class"],
            [(1, 1, 3, 3, f) for f, _ in _numbered(images, "test")[:100]],
        )
        tree["devkit/cars_meta.mat"] = mat_bytes([], [], CARS_NAMES)
    if layout == "kaggle":
        tree["names.csv"] = "".join(f"{n}\n" for n in CARS_NAMES).encode()
    tree.update({p: TINY_JPEG for p in truth})
    return tree, truth


def cars_archives(layout: str, tree: dict[str, bytes], folder: Path) -> list[Path]:
    """The files as distributed: a .tgz per top folder (car_ims.tgz; cars_train.tgz,
    cars_test.tgz, car_devkit.tgz) beside the loose .mat files, or the mirror's one zip."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "kaggle":
        (folder / "stanford-car-dataset-by-classes-folder.zip").write_bytes(zip_bytes(tree))
        return [folder / "stanford-car-dataset-by-classes-folder.zip"]
    names = {
        "car_ims": "car_ims.tgz",
        "cars_train": "cars_train.tgz",
        "cars_test": "cars_test.tgz",
        "devkit": "car_devkit.tgz",
    }
    groups: dict[str, dict[str, bytes]] = {}
    for path, data in tree.items():
        top = path.split("/")[0]
        groups.setdefault(names.get(top, top), {})[path] = data
    for name, members in groups.items():
        (folder / name).write_bytes(tar_bytes(members) if name in names.values() else members[name])
    return [folder / name for name in groups]


def write_tree(tree: dict[str, bytes], folder: Path) -> None:
    """Write {relative path: bytes} under folder (a copy someone unpacked by hand)."""
    for parent in {posixpath.dirname(path) for path in tree}:  # strings: 16k paths stay cheap
        os.makedirs(os.path.join(folder, parent), exist_ok=True)
    for path, data in tree.items():
        with open(os.path.join(folder, path), "wb") as f:
            f.write(data)


SOP_TRAIN, SOP_TEST = {1: "bicycle", 2: "bicycle", 3: "chair"}, {4: "chair", 5: "toaster"}


def sop_members(per_class: int = 2) -> dict[str, bytes]:
    """Stanford_Online_Products.zip: Ebay_{train,test}.txt (image_id class_id super_class_id
    path)."""
    out, rows, image_id = {}, {"train": [], "test": []}, 0
    supers = {"bicycle": 1, "chair": 2, "toaster": 3}
    for split, classes in (("train", SOP_TRAIN), ("test", SOP_TEST)):
        for cls, sup in classes.items():
            for k in range(per_class):
                image_id += 1
                rel = f"{sup}_final/{110000 + cls}_{k}.JPG"
                out[f"Stanford_Online_Products/{rel}"] = image_bytes(cls * 10 + k)
                rows[split].append(f"{image_id} {cls} {supers[sup]} {rel}")
    for split in ("train", "test"):
        text = "image_id class_id super_class_id path\n" + "\n".join(rows[split]) + "\n"
        out[f"Stanford_Online_Products/Ebay_{split}.txt"] = text.encode()
    out["Stanford_Online_Products/Ebay_info.txt"] = b"image_id class_id super_class_id path\n"
    return out


INSHOP = {
    "id_00000001": ["train"] * 2,
    "id_00000007": ["train"] * 3,
    "id_00000002": ["query", "gallery", "gallery"],
    "id_00000004": ["query", "query", "gallery"],
    "id_00000005": ["gallery", "query"],
}


def inshop_files() -> tuple[bytes, bytes]:
    """(img.zip with img/WOMEN/.../id_*/NN_k_front.jpg, list_eval_partition.txt)."""
    images, rows = {}, []
    for i, (item, splits) in enumerate(INSHOP.items()):
        for k, split in enumerate(splits):
            rel = f"img/WOMEN/Dresses/{item}/{k + 1:02d}_1_front.jpg"
            images[rel] = image_bytes(i * 10 + k, (16, 24))
            rows.append(f"{rel}{' ' * 20}{item}{' ' * 5}{split}")
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    return zip_bytes(images), text.encode()
