"""Test helpers for the data tests: a local HTTP server with Range support, tiny images, and
archives in each dataset's official layout (the same folders, list files and columns)."""
from __future__ import annotations

import contextlib
import http.server
import io
import re
import tarfile
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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


def image_bytes(seed: int, size: tuple[int, int] = (24, 20), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small image whose colour depends on `seed` (so classes differ)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.integers(-20, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        dirs = sorted({"/".join(name.split("/")[:i]) for name in members for i in range(1, name.count("/") + 1)})
        for d in dirs:  # official archives list their folders too
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------- official layouts

CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 100: "100.Brown_Pelican",
               101: "101.White_Pelican", 200: "200.Common_Yellowthroat"}


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
    return {"attributes.txt": b"1 has_bill_shape::curved\n",
            "CUB_200_2011/README": b"fixture\n",
            "CUB_200_2011/classes.txt": text(f"{c} {n}" for c, n in CUB_CLASSES.items()),
            "CUB_200_2011/images.txt": text(images),
            "CUB_200_2011/image_class_labels.txt": text(labels),
            "CUB_200_2011/train_test_split.txt": text(split),
            **files}


def omniglot_members(top: str, alphabets: dict[str, int], per_char: int = 2, seed: int = 0) -> dict[str, bytes]:
    """images_background.zip / images_evaluation.zip: top/Alphabet/characterNN/NNNN_MM.png (1-bit)."""
    out = {}
    for a, (alphabet, n_chars) in enumerate(alphabets.items()):
        for c in range(1, n_chars + 1):
            for d in range(1, per_char + 1):
                out[f"{top}/{alphabet}/character{c:02d}/{a:02d}{c:02d}_{d:02d}.png"] = \
                    image_bytes(seed + 1000 * a + 10 * c + d, (12, 12), "PNG", "1")
    return out


CARS_CLASSES = (1, 2, 98, 99, 196)


def cars_files(folder: Path, per_class: int = 2) -> list[Path]:
    """car_ims.tgz (car_ims/NNNNNN.jpg) and the devkit's cars_annos.mat (annotations, class_names)."""
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


SOP_TRAIN, SOP_TEST = {1: "bicycle", 2: "bicycle", 3: "chair"}, {4: "chair", 5: "toaster"}


def sop_members(per_class: int = 2) -> dict[str, bytes]:
    """Stanford_Online_Products.zip: Ebay_{train,test}.txt (image_id class_id super_class_id path)."""
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


INSHOP = {"id_00000001": ["train"] * 2, "id_00000007": ["train"] * 3,
          "id_00000002": ["query", "gallery", "gallery"], "id_00000004": ["query", "query", "gallery"],
          "id_00000005": ["gallery", "query"]}


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
